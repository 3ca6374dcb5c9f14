"""The robustness gate, as a package:

  policy.py   the pinned promotion policy and its floor (torch-free)
  verdict.py  the verdict recomputed from a card's per-image evidence under the policy (torch-free): the gate,
              export and the server all call `verify`
  signing.py  Ed25519 signatures over card + weights + policy (the `cryptography` library; torch-free)
  run.py      the measurement: attacks, per-batch state, sanity checks, the card (torch)

Import from the submodules (`from dbp.gate.run import GateConfig, run`); names of run.py are also resolved here
lazily, so `import dbp.gate.verdict` (the server, export) never loads torch. `dbp.gate.run` is the module.
"""
from __future__ import annotations

import importlib

_TORCH_FREE = {"policy", "verdict", "signing"}


def __getattr__(name: str):
    if name in _TORCH_FREE or name == "run":  # the submodules themselves
        return importlib.import_module(f"{__name__}.{name}")
    module = importlib.import_module(f"{__name__}.run")  # the measurement's names: GateConfig, PRESETS, ...
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
