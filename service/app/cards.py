"""A short summary of a version's robustness card (what the gate measured), read from the model repository.

Read-only and cached per file modification time; a missing or unreadable card gives None, never an error
(the card is information for the caller, not a condition for serving: Triton itself refuses versions
whose card did not pass).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("service.cards")
CARD_FILE = "robustness_card.json"


def _num(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _ci(x: Any) -> Optional[list[float]]:
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(_num(v) is not None for v in x):
        return [float(v) for v in x]
    return None


def summarize(card: dict) -> dict:
    clean = ((card.get("clean") or {}).get("purified") or {}) if isinstance(card.get("clean"), dict) else {}
    data = card.get("data") if isinstance(card.get("data"), dict) else {}
    settings = []
    for s in card.get("settings") or []:
        if not isinstance(s, dict):
            continue
        # schema 2 cards judge the worst case over the attacks that ran; schema 1 has only `robust`
        robust = next((s[k] for k in ("worst_case", "robust") if isinstance(s.get(k), dict)), {})
        expected = s.get("robust_expected") if isinstance(s.get("robust_expected"), dict) else {}
        settings.append({"setting": str(s.get("name", "?")), "description": s.get("setting"),
                         "mode": s.get("mode"), "threat_model": s.get("threat_model"), "eps": _num(s.get("eps")),
                         "n": s.get("n") if isinstance(s.get("n"), int) else robust.get("n"),
                         "robust_accuracy": _num(robust.get("acc")), "ci95": _ci(robust.get("ci95")),
                         "expected_robust_accuracy": _num(expected.get("acc"))})
    gate = card.get("gate") if isinstance(card.get("gate"), dict) else {}
    return {"gate_passed": gate.get("passed") if isinstance(gate.get("passed"), bool) else None,
            "dataset": data.get("dataset"), "n": data.get("n") if isinstance(data.get("n"), int) else None,
            "clean_accuracy": _num(clean.get("acc")), "clean_ci95": _ci(clean.get("ci95")), "settings": settings}


class CardReader:
    def __init__(self, repository: Optional[Path], purifier_model: str):
        self.repository = repository
        self.model = purifier_model
        self._cache: dict[int, tuple[float, Optional[dict]]] = {}

    def summary(self, version: int) -> Optional[dict]:
        if self.repository is None:
            return None
        path = self.repository / self.model / str(version) / CARD_FILE
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        hit = self._cache.get(version)
        if hit and hit[0] == mtime:
            return hit[1]
        try:
            card = json.loads(path.read_text())
            summary = summarize(card) if isinstance(card, dict) else None
        except (OSError, ValueError) as e:
            log.warning("cannot read %s: %s", path, e)
            summary = None
        self._cache[version] = (mtime, summary)
        return summary
