"""The pinned promotion policy: one file in the repository (dbp/gate/promotion_policy.json, package data, so it
travels with dbp into the Triton image), never a path from the command line or a file found beside a
checkpoint. Torch-free: the server, export and the gateway's checks load it too.

`FLOOR` is what no policy may go below (issue 19's rules); `load_policy` refuses a policy file that is
weaker, so editing the file cannot quietly open the gate. An experiment may measure under another policy
object (`dbp.gate.run` records its sha256 on the card), but `verdict.verify` refuses any card whose policy
sha256 is not the pinned file's.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from ..threat_models import MODES, THREAT_MODELS

# what a card and the receipt say about a setting of a declared / a reported threat model
CLAIM_DECLARED = "declared threat model: the defence is claimed and judged here"
CLAIM_REPORTED = "reported: not defended at this budget (measured and shown, judged by non-inferiority only)"
POLICY_FILE = Path(__file__).resolve().parent / "promotion_policy.json"
SCHEMA = "dbp.promotion_policy/1"
FLOOR = {"declared_threat_models": ("paper",), "modes": MODES, "min_steps": 20, "min_eot": 10, "min_k": 10,
         "min_n": {"dwbox": 256, "eot": 64}, "vs_bare_alpha": 0.01, "vs_bare_min_lower_bound": 0.10,
         "min_clean_purified": 0.80, "min_clean_bare": 0.80, "large_budget_max_acc": 0.10,
         "non_inferiority_margin": 0.02, "superiority_alpha": 0.05}


class PolicyError(ValueError):
    """The policy file is missing, unreadable, malformed or weaker than the floor."""


def canonical_sha256(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces): what signatures and bindings hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_policy() -> dict:
    """The repository's policy, checked against the floor; its `sha256` (of the parsed content) added."""
    path = POLICY_FILE
    try:
        policy = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PolicyError(f"cannot read the promotion policy {path}: {e}") from None
    problems = floor_problems(policy)
    if problems:
        raise PolicyError(f"{path} is weaker than the floor in dbp/gate/policy.py: " + "; ".join(problems))
    return {**policy, "sha256": canonical_sha256(policy)}


def floor_problems(p: Any) -> list[str]:
    """Why a policy object is malformed or weaker than FLOOR (empty: it is not)."""
    if not isinstance(p, Mapping) or p.get("schema") != SCHEMA:
        return [f"schema must be {SCHEMA!r}"]
    out = []

    def num(path: str, default=None):
        cur: Any = p
        for key in path.split("."):
            cur = cur.get(key) if isinstance(cur, Mapping) else None
        if isinstance(cur, bool) or not isinstance(cur, (int, float)):
            out.append(f"{path} must be a number, got {cur!r}")
            return default
        return cur

    declared = (p.get("declared") or {}) if isinstance(p.get("declared"), Mapping) else {}
    tms, modes = list(declared.get("threat_models") or []), list(declared.get("modes") or [])
    if not set(FLOOR["declared_threat_models"]) <= set(tms) or not set(tms) <= set(THREAT_MODELS):
        out.append(f"declared.threat_models must include {list(FLOOR['declared_threat_models'])} and name only "
                   f"{list(THREAT_MODELS)}, got {tms}")
    if set(modes) != set(MODES):
        out.append(f"declared.modes must be {list(MODES)}, got {modes}")
    reported = list(((p.get("reported") or {}) if isinstance(p.get("reported"), Mapping) else {})
                    .get("threat_models") or [])
    if not set(reported) <= set(THREAT_MODELS) or set(reported) & set(tms):
        out.append(f"reported.threat_models must name threat models of {list(THREAT_MODELS)} not declared, "
                   f"got {reported}")
    at_least = {"attack.min_steps": FLOOR["min_steps"], "attack.min_eot": FLOOR["min_eot"],
                "attack.min_k": FLOOR["min_k"], "min_n.dwbox": FLOOR["min_n"]["dwbox"],
                "min_n.eot": FLOOR["min_n"]["eot"], "vs_bare.min_lower_bound": FLOOR["vs_bare_min_lower_bound"],
                "min_clean_purified": FLOOR["min_clean_purified"], "min_clean_bare": FLOOR["min_clean_bare"]}
    at_most = {"vs_bare.alpha": FLOOR["vs_bare_alpha"], "large_budget.max_acc": FLOOR["large_budget_max_acc"],
               "baseline.non_inferiority_margin": FLOOR["non_inferiority_margin"],
               "baseline.superiority_alpha": FLOOR["superiority_alpha"]}
    for key, lo in at_least.items():
        v = num(key)
        if v is not None and v < lo:
            out.append(f"{key} {v} is below the floor {lo}")
    for key, hi in at_most.items():
        v = num(key)
        if v is not None and (v > hi or v < 0):
            out.append(f"{key} {v} is above the floor's {hi}")
    eps = num("large_budget.eps")
    if eps is not None and eps > 0.3:
        out.append(f"large_budget.eps {eps} is above 0.3 (the collapse check must use at most a third of the range)")
    return out


def is_declared(policy: Mapping, threat_model: str) -> bool:
    return threat_model in policy["declared"]["threat_models"]
