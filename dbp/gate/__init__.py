"""The robustness gate, as a package:

  policy.py   the pinned promotion policy and its floor (torch-free)
  verdict.py  the verdict recomputed from a card's per-image evidence under the policy (torch-free): the gate,
              export and the server all call `verify`
  signing.py  Ed25519 signatures over card + weights + policy (the `cryptography` library; torch-free)
  config.py   GateConfig, presets, the settings and their noise streams, GateError (the library's one error)
  protocol.py the measurement: set-up, one batch of every setting (attacks, served VOTES), sanity checks (torch)
  report.py   the card from the merged per-image results, its plots and printed summary
  run.py      the run: per-batch state, torchrun shards, merge, convergence report, sign, decide

Import from the submodules (`from dbp.gate.config import GateConfig`, `from dbp.gate.run import run`); `import
dbp.gate.verdict` (the server, export) never loads torch.
"""
from __future__ import annotations

import importlib

_SUBMODULES = {"policy", "verdict", "signing", "config", "protocol", "report", "run"}


def __getattr__(name: str):
    if name in _SUBMODULES:  # loaded on first use, so the torch-free ones stay torch-free
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
