#!/bin/sh
# Clean purified accuracy of the served purifier (version 2, trained on t <= 100) and of the certify denoiser
# (fine-tuned on t <= 300) at t* = 100, 200, 300 (DDIM, N = 100), 1024 Fashion-MNIST test images, the served
# classifier: why there is no `strong` serving profile yet (README "Serving profiles"). Run from a clean checkout:
#   sh experiments/profiles/clean_by_tstar.sh        -> docs/results/profiles/clean-<weights>-t<t*>.json
set -e
cd "$(dirname "$0")/../.."
mkdir -p docs/results/profiles
for w in purifier/2 certify/1; do
  for t in 100 200 300; do
    nice -n 19 .venv/bin/python -m training.evaluate --purifier model_repository/$w/weights \
      --classifier model_repository/classifier/2/weights --n 1024 --samplers ddim --t_star $t --threads 1 \
      --out docs/results/profiles/clean-$(echo $w | tr / -)-t$t.json
  done
done
