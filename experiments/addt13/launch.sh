#!/usr/bin/env bash
# Issue 13: the ADDT arm and the clean-fine-tuning arm from the same start (the served base purifier v1),
# same recipe, data order and seeds; weights-only snapshots every 150 steps for the learning curve.
# Rerunning resumes each arm from runs/addt13/<arm>/checkpoint; STEPS=3000 extends both (constant LR).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs/addt13
for mode in ${ARMS:-addt clean}; do
  nohup nice -n 19 .venv/bin/python -m training.run_addt --preset default --mode "$mode" \
    --init model_repository/purifier/1/weights --classifier model_repository/classifier/1/weights \
    --steps "${STEPS:-1500}" --ckpt_every 25 --keep_every 150 --threads 1 \
    --out_dir "runs/addt13/$mode" >> "runs/addt13/$mode.log" 2>&1 &
  echo "$mode: pid $!, log runs/addt13/$mode.log"
done
