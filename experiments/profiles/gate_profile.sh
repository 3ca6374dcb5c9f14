#!/bin/sh
# A serving profile's card for a published purifier version at card-v2's sizes: 64 DW-box / 16 EoT images per
# setting (l_inf 8/255, l_2 0.5, Fashion l_inf 0.1), PGD-20, EoT-10, expected accuracy over k = 10, one vote;
# the sizes of docs/results/card-v2.json, not the pinned policy's 256 / 64, so such a card is served only through
# the legacy list, as version 2's default card is. Signed when DBP_GATE_SIGNING_KEY names the gate's private key.
# Resumable: the gate keeps its per-batch state in runs/gate/v<VERSION>-<PROFILE>; rerun to continue.
#   sh experiments/profiles/gate_profile.sh 2 fast ddim 40 100       # how cards/fast.json was made
#   sh experiments/profiles/gate_profile.sh 2 strong vpsde 100 100   # VP-SDE, 10 Euler-Maruyama steps from t* = 100
# Then: python -m training.profiles legacy-entry ... (review, add to model_repository/legacy.json), and
#       python -m training.profiles add --repository model_repository --version VERSION --profile PROFILE \
#           --card runs/gate/v<VERSION>-<PROFILE>/card.json
# Run it from a clean checkout: the card records the commit. About 1 h of one idle core for 10 UNet calls.
set -e
[ $# -eq 5 ] || { echo "usage: $0 VERSION PROFILE SAMPLER NUM_INFERENCE_STEPS T_STAR" >&2; exit 2; }
cd "$(dirname "$0")/../.."
mkdir -p runs/gate
nice -n 19 .venv/bin/python -m training.gate --repository model_repository --version "$1" --sampler "$3" \
  --num_inference_steps "$4" --t_star "$5" --n_images 64 --n_images_eot 16 --batch_size 8 --k 10 --votes 1 \
  --threads 1 --out_dir "runs/gate/v$1-$2" > "runs/gate/v$1-$2.log" 2>&1
