#!/usr/bin/env bash
# Where experiments/v3/ship.sh stands (run it from the checkout ship.sh runs in): the candidate's training step,
# and per gate run the batches saved of those its config asks for, with the wall seconds each took (time_s).
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-1500}
snaps=runs/addt13/addt-lambda/snapshots
last=$(ls "$snaps" 2>/dev/null | tail -1 || true)
echo "training: newest snapshot ${last:-none} (target step_$(printf %06d "$STEPS")); log: runs/v3/train.log"
for run in baseline-v2 candidate; do
  .venv/bin/python - "runs/v3/$run" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
d = Path(sys.argv[1]); st = d / "state"
if not (st / "config.json").exists():
    sys.exit(print(f"{d.name}: not started"))
cfg = json.loads((st / "config.json").read_text())
n = -(-cfg["n_images"] // cfg["batch_size"])
files = sorted(st.glob("batch_*.safetensors"))
secs = [float(load_file(f)["time_s"][0]) for f in files]
eot = -(-cfg["n_images_eot"] // cfg["batch_size"])
done = "card written" if (d / "card.json").exists() else f"{len(files)}/{n} batches"
print(f"{d.name}: {done} (the first {eot} carry the EoT and votes attacks); "
      + (f"batch wall seconds {', '.join(f'{s:.0f}' for s in secs)}" if secs else "no batch saved yet"))
PY
done
