#!/usr/bin/env bash
# Issue 13: the ADDT arm and the clean-fine-tuning arm from the same start (the served base purifier v1),
# same recipe, data order and seeds; weights-only snapshots every 150 steps for the learning curve.
# Rerunning resumes each arm from runs/addt13/<arm>/checkpoint; STEPS=3000 extends both (constant LR).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs/addt13
# ARMS="addt-lambda" adds the documented deviation arm: ADDT with twice the recipe's lambda_unit (0.06 vs 0.03),
# a larger adversarial share of the noise mixture (lambda_max 0.3 still caps it), same start, data and seeds.
for arm in ${ARMS:-addt clean}; do
  case "$arm" in
    addt|clean) extra=(--mode "$arm") ;;
    addt-lambda) extra=(--mode addt --lambda_unit "${LAMBDA_UNIT:-0.06}") ;;
    *) echo "unknown arm $arm (addt, clean or addt-lambda)" >&2; exit 2 ;;
  esac
  nohup nice -n 19 .venv/bin/python -m training.run_addt --preset default "${extra[@]}" \
    --init model_repository/purifier/1/weights --classifier model_repository/classifier/1/weights \
    --steps "${STEPS:-1500}" --ckpt_every 25 --keep_every 150 --threads 1 \
    --out_dir "runs/addt13/$arm" >> "runs/addt13/$arm.log" 2>&1 &
  echo "$arm: pid $!, log runs/addt13/$arm.log"
done
