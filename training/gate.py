"""Robustness gate CLI: attack purifier+classifier, write a robustness card, pass or fail against thresholds.

The protocol, card, verdict and comparison live in dbp/gate.py (its docstring lists the thresholds keys);
this is the command line over `dbp.gate.run`.

  # the deployed pair on the CPU machine (DW-box 64 images, EoT 16; both threat models, sanity checks)
  python -m training.gate --preset cpu --thresholds configs/gate-fashion-cpu.json --out_dir runs/gate/v2
  # checkpoints
  python -m training.gate --purifier runs/addt/checkpoint --classifier runs/classifier/checkpoint \
      --preset cpu --thresholds configs/gate-fashion-cpu.json --out_dir runs/gate/cand
  # paired promotion test against the deployed card (same images, seeds and settings)
  python -m training.gate ... --baseline_card model_repository/purifier/2/robustness_card.json
  # convergence evidence: robust accuracy vs PGD steps 20/50/100 and EoT 10/20/50 on a few images
  python -m training.gate --preset cpu --report convergence --n_images 8 --out_dir runs/gate/convergence
  # paper scale (1024 images, DDPM 101 steps, PGD-20 + EoT-10): a GPU job, sharded
  torchrun --nproc_per_node 4 -m training.gate --purifier ... --classifier ... --preset paper \
      --thresholds configs/gate-fashion-gpu.json

Exit codes: 0 card written and gate passed (or --gate false); 1 gate failed (reasons on stderr);
2 bad input; 3 stopped early (--max_batches) with results saved: rerun the same command to resume.
Results are saved per batch under OUT_DIR/state/, so a killed run continues where it stopped.
"""
from __future__ import annotations

import sys

from dbp import config as C
from dbp.gate import PRESETS, GateConfig, run
from dbp.runtime import set_threads


def main(argv=None) -> int:
    cfg = C.parse_cli(GateConfig, argv, PRESETS, prog="python -m training.gate")
    set_threads(cfg.threads)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
