"""Threat models, once: norms, attack modes and the budgets (eps, step) in [0, 1] pixel units. Torch-free.

"paper": the paper's CIFAR-10 budgets (method.md §3.1), the threat models this product declares. "fashion": the
budget customary for Fashion-MNIST, reported on every card and judged by non-inferiority only (at t* = 0.1T
every purifier gives about the same there: t*, not the weights, decides it). Modes: "dwbox" (the purifier's
noise fixed and known to the attacker) first, then "eot" (fresh noise, the served setting).
"""
from __future__ import annotations

NORMS = ("linf", "l2")
MODES = ("dwbox", "eot")
THREAT_MODELS = {"paper": {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.1)},
                 "fashion": {"linf": (0.1, 0.025)}}
PAPER_BUDGET = THREAT_MODELS["paper"]
