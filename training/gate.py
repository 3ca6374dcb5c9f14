"""Robustness gate CLI: attack purifier+classifier, write a robustness card, pass or fail against thresholds.

The measurement lives in dbp/gate/ (config, protocol, report, run), the verdict (recomputed from the card's per-image evidence under the
pinned policy dbp/gate/promotion_policy.json) in dbp/gate/verdict.py; this is the command line over
`dbp.gate.run.run`. Purification settings default to what the repository serves. DBP_GATE_SIGNING_KEY names the
private key that signs the card (without it the card is written unsigned and cannot be exported).

  # the deployed pair at the policy's CPU sizes (DW-box 256, EoT 64 at k=10): the baseline measurement
  python -m training.gate --repository model_repository --version 2 --preset cpu --gate false --out_dir runs/gate/v2
  # a candidate, compared with the deployed version on the same images and seeds
  python -m training.gate --purifier runs/addt/checkpoint --classifier runs/classifier/checkpoint \
      --preset cpu --baseline_card runs/gate/v2/card.json --out_dir runs/gate/cand
  # a serving profile's card (its t_star / sampler / steps from config.pbtxt `profiles`), then attach it
  python -m training.gate --repository model_repository --version 2 --profile fast --preset cpu --out_dir runs/gate/v2-fast
  python -m training.profiles add --repository model_repository --version 2 --profile fast --card runs/gate/v2-fast/card.json
  # convergence evidence: robust accuracy vs PGD steps 20/50/100 and EoT 10/20/50 on a few images
  python -m training.gate --preset cpu --report convergence --n_images 8 --out_dir runs/gate/convergence
  # paper scale (1024 images, DDPM 101 steps, PGD-20 + EoT-10): a GPU job, sharded
  torchrun --nproc_per_node 4 -m training.gate --purifier ... --classifier ... --preset paper

Exit codes: 0 card written and gate passed (or --gate false); 1 gate failed (reasons on stderr);
2 bad input; 3 stopped early (--max_batches) with results saved: rerun the same command to resume.
Results are saved per batch under OUT_DIR/state/, so a killed run continues where it stopped.
"""
from __future__ import annotations

import sys

from dbp import config as C
from dbp.gate.config import PRESETS, GateConfig, GateError
from dbp.gate.run import run
from dbp.runtime import set_threads


def main(argv=None) -> int:
    cfg = C.parse_cli(GateConfig, argv, PRESETS, prog="python -m training.gate")
    set_threads(cfg.threads)
    try:
        return run(cfg)
    except GateError as e:  # the library's one error type; the exit status is the CLI's business
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
