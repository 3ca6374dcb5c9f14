#!/usr/bin/env bash
# Issue 13, final measurement of one model with the served settings (DDIM N=100, t*=100) and the paper's
# attacks (PGD-20, best iterate), on the gate's images (the first of the test split), seed 0 for every model
# so the per-image outcomes pair up:
#   linf: DW-box on 512 images, stochastic white-box PGD-20 + EoT-10 on the first 64 (single-shot and expected
#         over k=10 purifications), DW-box images re-evaluated under fresh noise
#   l2:   DW-box on 256 images
# Usage: experiments/addt13/final.sh NAME PURIFIER_DIR [OUT_ROOT]   (rerun = resume; cards: OUT_ROOT/NAME-{linf,l2}/card.json)
#        PART=linf-dwbox experiments/addt13/final.sh ...   only DW-box l_inf on the 512 (card: OUT_ROOT/NAME-linf-dwbox/)
# Run it from a clean checkout (cards record the commit): git worktree add --detach /tmp/wt-final main
set -euo pipefail
name=$1; purifier=$2; out=${3:-runs/final}
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
common=(--preset cpu --purifier "$purifier" --classifier model_repository/classifier/1/weights
        --sampler ddim --num_inference_steps 100 --t_star 100 --threat_models paper --sanity_n 0
        --batch_size 16 --seed 0 --threads 1 --gate false)
case "${PART:-all}" in
  all)
    nice -n 10 "$py" -m training.gate "${common[@]}" --norms linf --modes dwbox,eot --n_images 512 --n_images_eot 64 \
      --out_dir "$out/$name-linf"
    nice -n 10 "$py" -m training.gate "${common[@]}" --norms l2 --modes dwbox --n_images 256 --out_dir "$out/$name-l2" ;;
  linf-dwbox)  # the headline row alone (about half the l_inf cost: no EoT), e.g. for later checkpoints
    nice -n 10 "$py" -m training.gate "${common[@]}" --norms linf --modes dwbox --n_images 512 \
      --out_dir "$out/$name-linf-dwbox" ;;
  *) echo "PART must be all or linf-dwbox, got ${PART}" >&2; exit 2 ;;
esac
