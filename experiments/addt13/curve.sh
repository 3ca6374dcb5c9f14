#!/usr/bin/env bash
# Issue 13: the learning curve over the base and every snapshot of runs/addt13/*/snapshots (resumable:
# a rerun evaluates only snapshots it has not seen; EVERY=300 takes every second snapshot first). Table: runs/learning_curve/curve.md; plot:
# docs/figures/addt_learning_curve.png. ARMS=dir,dir,... picks the arms (default: addt and clean).
set -euo pipefail
cd "$(dirname "$0")/../.."
nohup nice -n 19 .venv/bin/python -m training.learning_curve --n_images "${N_IMAGES:-128}" --every "${EVERY:-0}" \
  --arms "${ARMS:-runs/addt13/addt,runs/addt13/clean}" \
  >> runs/addt13/curve.log 2>&1 &
echo "curve: pid $!, log runs/addt13/curve.log"
