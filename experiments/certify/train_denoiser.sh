#!/usr/bin/env bash
# Start or resume the one-shot denoiser for randomized smoothing (issue 23, docs/certify.md): the shipped
# purifier (model_repository/purifier/1, trained on t <= 100) fine-tuned on t in [0, 300], which covers the
# smoothing timesteps t=144 (sigma 0.25) and t=258 (sigma 0.5). Runs in the background at nice 15 on one
# thread; the same command resumes from runs/certify/denoiser/checkpoint (atomic, every 100 steps).
#
#   experiments/certify/train_denoiser.sh            # start / resume
#   tail -f runs/certify/denoiser.log                # progress bar (tqdm) and the resume line
#   .venv/bin/python -m experiments.certify.denoise_quality --unet runs/certify/denoiser/checkpoint
#
# Keep STEPS the same across resumes: the cosine learning-rate schedule is a function of it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/certify/denoiser}
STEPS=${STEPS:-4000}
mkdir -p "$(dirname "$OUT")"
if [ -f "$OUT.pid" ] && tr '\0' ' ' 2>/dev/null < "/proc/$(cat "$OUT.pid")/cmdline" | grep -q -- "--out_dir $OUT"; then
  echo "already running: pid $(cat "$OUT.pid") (log $OUT.log)"; exit 0
fi
nice -n 15 .venv/bin/python -m training.train_diffusion --preset default \
  --init model_repository/purifier/1/weights --t_min 0 --t_max 300 \
  --steps "$STEPS" --lr 5e-4 --warmup 50 --ckpt_every 100 --grid_n 8 \
  --threads 1 --out_dir "$OUT" >> "$OUT.log" 2>&1 &
echo $! > "$OUT.pid"
echo "started pid $! -> $OUT (log $OUT.log)"
