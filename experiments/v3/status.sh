#!/usr/bin/env bash
# Where experiments/v3/ship.sh stands: the candidate's training step, and per gate run the batches saved of those its
# config asks for, with the wall seconds each took (time_s).
#   experiments/v3/status.sh [CHECKOUT]    # CHECKOUT: where ship.sh runs (its runs/v3); default this checkout
set -euo pipefail
cd "${1:-$(dirname "$0")/../..}"
STEPS=${STEPS:-1500}
PY=${PY:-.venv/bin/python}
snaps=runs/addt13/addt-lambda/snapshots
last=$(ls "$snaps" 2>/dev/null | tail -1 || true)
echo "$(pwd) training: newest snapshot ${last:-none} (target step_$(printf %06d "$STEPS")); log: runs/v3/train.log"
for run in baseline-v2 candidate; do
  "$PY" - "runs/v3/$run" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
d = Path(sys.argv[1]); st = d / "state"
if not (st / "config.json").exists():
    sys.exit(print(f"{d.name}: not started"))
cfg = json.loads((st / "config.json").read_text())
bs = cfg["batch_size"]
n = -(-cfg["n_images"] // bs)
eot = -(-min(cfg.get("n_images_eot") or cfg["n_images"], cfg["n_images"]) // bs)
files = sorted(st.glob("batch_*.safetensors"))
secs = [float(load_file(f)["time_s"][0]) for f in files]
card = d / "card.json"
if card.exists():
    c = json.loads(card.read_text())
    done = ("signed card" if "signature" in c else "card (measured, not judged or not signed)") + f", {card}"
else:
    done = f"{len(files)}/{n} batches"
print(f"{d.name}: {done} (the first {eot} batches carry the EoT and votes attacks); "
      + (f"batch wall seconds {', '.join(f'{s:.0f}' for s in secs)}" if secs else "no batch saved yet"))
PY
done
