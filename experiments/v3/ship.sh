#!/usr/bin/env bash
# Issue 19: ship version 3. One committed command, resumable (rerun it: every step continues where it stopped).
#   DBP_GATE_SIGNING_KEY=~/.config/dbp/gate-ed25519.pem experiments/v3/ship.sh
# Steps: (1) the candidate, the lambda_unit 0.06 ADDT arm (a documented deviation from the recipe: the best
# purifier measured, 70.3% vs the recipe's 64.8% DW-box l_inf on 128 held-out images at 1,500 steps, 7/0
# discordant, p = 0.016; docs/results/addt13/curve.md); (2) the deployed version 2 measured with the gate's
# protocol at the pinned policy's sizes (the mandatory baseline: same images and seeds); (3) the candidate's
# gate run, compared with it and signed; (4) export, which recomputes the verdict; (5) the receipt check.
# Cost on the 2-core CPU VM, idle: (1) ~1 h of one core, (2) and (3) ~4-5 h of one core each ((2) beside (1); an EoT batch 22-29 min).
# Progress: tail -f runs/v3/*.log (tqdm), or experiments/v3/status.sh; stop any time, rerun to continue.
# Run it from a clean checkout (the cards record the commit, and a -dirty one fails the policy).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DBP_GATE_SIGNING_KEY:?set it to the private key of the gate; a new pair: python -m dbp.gate.signing new --private PATH}"
STEPS=${STEPS:-1500}
PY=.venv/bin/python
mkdir -p runs/v3
step=$(printf "step_%06d" "$STEPS")
# one process per step even when the script is rerun while an earlier run still works on it
once() { local lock=$1; shift; flock -n "$lock" "$@" || { echo "ship.sh: $lock is held by a running step; wait for it" >&2; return 75; }; }
# (2) the deployed version 2, measured with the gate's protocol at the policy's sizes: needs no candidate, so
# it runs beside the training (one thread each; per-batch state: a rerun resumes)
once runs/v3/baseline.lock nice -n 10 $PY -m training.gate --repository model_repository --version 2 --preset cpu \
  --gate false --threads 1 --out_dir runs/v3/baseline-v2 > runs/v3/baseline-v2.log 2>&1 &
base=$!
# (1) the candidate
if [ ! -d "runs/addt13/addt-lambda/snapshots/$step" ]; then
  once runs/v3/train.lock nice -n 10 $PY -m training.run_addt --preset default --mode addt --lambda_unit 0.06 \
    --init model_repository/purifier/1/weights --classifier model_repository/classifier/1/weights \
    --steps "$STEPS" --ckpt_every 25 --keep_every 150 --threads 1 --out_dir runs/addt13/addt-lambda \
    > runs/v3/train.log 2>&1
fi
# (3) the candidate measured (as (2), --gate false) ...
cand=(--purifier "runs/addt13/addt-lambda/snapshots/$step" --classifier model_repository/classifier/2/weights)
once runs/v3/candidate.lock nice -n 10 $PY -m training.gate "${cand[@]}" --preset cpu --gate false --threads 1 \
  --out_dir runs/v3/candidate > runs/v3/candidate-measure.log 2>&1
wait "$base"
# ... then judged against the baseline from the saved batches (nothing is re-measured) and signed
set +e
$PY -m training.gate "${cand[@]}" --preset cpu --threads 1 --baseline_card runs/v3/baseline-v2/card.json \
  --out_dir runs/v3/candidate 2>&1 | tee runs/v3/candidate.log
set -e
# (4) export (recomputes the verdict, refuses a card that does not pass) and (5) the receipt check
$PY -m training.export "${cand[@]}" --card runs/v3/candidate/card.json
$PY -m training.verify model_repository/purifier
