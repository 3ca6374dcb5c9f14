"""A short summary of a version's robustness card (what the gate measured), read from the model repository.

Read-only and cached per file modification time; a missing or unreadable card gives None, never an error
(the card is information for the caller, not a condition for serving). The gate status is the SERVER's
decision, never the card's own `gate.passed`: Triton loads a version only if its card is signed by a trusted
gate key and passes the pinned policy when recomputed from its evidence, or if the repository's legacy list
names that exact card (dbp.repository.check_version). So a served version is "legacy" when the list names
its card (sha256), "passed" when its card is signed (schema 3), and "unverified" otherwise.

That reasoning holds only for the card the server checked, so a summary carries the sha256 of the bytes it was read
from, and bind_summary compares it with the sha256 the purifier answers per row (CARD_SHA256, the card it checked at
load): a card changed on disk since the load, or a gateway mount that differs from Triton's, has its figures withheld.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("service.cards")
CARD_FILE = "robustness_card.json"
CARDS_DIR = "cards"  # dbp.repository.CARDS_DIR: <version>/cards/<profile>.json, a serving profile's card
DEFAULT_PROFILE = "default"  # its card is CARD_FILE; a legacy entry without "profile" is its
LEGACY_FILE = "legacy.json"  # dbp.repository.LEGACY_FILE; tests/service/test_gateway_units.py ties the two
SIGNED_SCHEMA = "dbp.robustness_card/3"
# the receipt's card binding (schemas.RobustnessSummary.card_binding); the gate status of a withheld summary
VERIFIED, UNCHECKED, MISMATCH = "verified", "unchecked", "mismatch"
CARD_MISMATCH = "card_mismatch"


def _num(x: Any) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _ci(x: Any) -> Optional[list[float]]:
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(_num(v) is not None for v in x):
        return [float(v) for v in x]
    return None


def gate_status(card: dict, legacy: Optional[dict]) -> dict:
    """What the server decided about a card it serves (see the module docstring)."""
    if legacy is not None:
        return {"gate": "legacy", "failed_rules": [str(r) for r in legacy.get("failed_rules") or []],
                "legacy_expires": legacy.get("expires"), "legacy_approver": legacy.get("approver")}
    signed = card.get("schema") == SIGNED_SCHEMA and isinstance(card.get("signature"), dict)
    policy = card.get("policy") if isinstance(card.get("policy"), dict) else {}
    return {"gate": "passed" if signed else "unverified", "policy_sha256": policy.get("sha256") if signed else None,
            "signed_by": card["signature"].get("key_id") if signed else None}


def summarize(card: dict, legacy: Optional[dict] = None) -> dict:
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
                         "expected_robust_accuracy": _num(expected.get("acc")),
                         "votes": s.get("votes") if isinstance(s.get("votes"), int) else 1,
                         "declared": s.get("declared") if isinstance(s.get("declared"), bool) else None,
                         "claim": s.get("claim") if isinstance(s.get("claim"), str) else None})
    voted = card.get("served_votes") if isinstance(card.get("served_votes"), dict) else {}
    for r in voted.get("rows") or []:
        if isinstance(r, dict):
            robust = r.get("robust") if isinstance(r.get("robust"), dict) else {}
            settings.append({"setting": str(r.get("name", "?")), "description": (r.get("attack") or {}).get("outcome"),
                             "mode": r.get("mode"), "threat_model": r.get("threat_model"), "eps": _num(r.get("eps")),
                             "n": r.get("n") if isinstance(r.get("n"), int) else None,
                             "robust_accuracy": _num(robust.get("acc")), "ci95": _ci(robust.get("ci95")),
                             "votes": r.get("votes") if isinstance(r.get("votes"), int) else None,
                             "declared": True, "claim": r.get("claim") if isinstance(r.get("claim"), str) else None})
    attacked = voted.get("attacked")
    return {**gate_status(card, legacy),
            "votes_attacked": [int(v) for v in attacked if isinstance(v, int)] if isinstance(attacked, list) else None,
            "dataset": data.get("dataset"), "n": data.get("n") if isinstance(data.get("n"), int) else None,
            "clean_accuracy": _num(clean.get("acc")), "clean_ci95": _ci(clean.get("ci95")), "settings": settings}


class CardReader:
    """Per (version, serving profile): the summary of that profile's card ("default": CARD_FILE, another profile:
    cards/<profile>.json), with the legacy list applied per profile (an entry's "profile", absent = "default")."""

    def __init__(self, repository: Optional[Path], purifier_model: str):
        self.repository = repository
        self.model = purifier_model
        # keyed by the card's and the legacy list's identity (mtime in ns, size, inode): either one changes the summary,
        # and a file replaced by a copy that keeps its mtime (cp -p, rsync -a) still has another inode or size
        self._cache: dict[tuple[int, str], tuple[tuple, Optional[dict]]] = {}

    def path(self, version: int, profile: str = DEFAULT_PROFILE) -> Optional[Path]:
        if self.repository is None:
            return None
        d = self.repository / self.model / str(version)
        return d / CARD_FILE if profile == DEFAULT_PROFILE else d / CARDS_DIR / f"{profile}.json"

    def summary(self, version: int, profile: str = DEFAULT_PROFILE) -> Optional[dict]:
        path = self.path(version, profile)
        if path is None:
            return None
        try:
            mtime = (self._identity(path, strict=True), self._identity(self.repository / LEGACY_FILE))
        except OSError:
            return None
        hit = self._cache.get((version, profile))
        if hit and hit[0] == mtime:
            return hit[1]
        try:
            raw = path.read_bytes()
            card = json.loads(raw)
            sha = hashlib.sha256(raw).hexdigest()
            summary = {**summarize(card, self._legacy(version, sha, profile)), "card_sha256": sha} \
                if isinstance(card, dict) else None
        except (OSError, ValueError) as e:
            log.warning("cannot read %s: %s", path, e)
            summary = None
        self._cache[(version, profile)] = (mtime, summary)
        return summary

    def _legacy(self, version: int, card_sha256: str, profile: str = DEFAULT_PROFILE) -> Optional[dict]:
        try:
            listed = json.loads((self.repository / LEGACY_FILE).read_text())
        except (OSError, ValueError):
            return None
        for e in listed.get("versions", []) if isinstance(listed, dict) else []:
            if isinstance(e, dict) and e.get("model") == self.model and str(e.get("version")) == str(version) \
                    and e.get("profile", DEFAULT_PROFILE) == profile and e.get("card_sha256") == card_sha256:
                return e
        return None

    @staticmethod
    def _identity(path: Path, strict: bool = False) -> tuple:
        try:
            st = path.stat()
        except OSError:
            if strict:
                raise
            return ()
        return st.st_mtime_ns, st.st_size, st.st_ino


def bind_summary(summary: Optional[dict], served: Optional[list[str]], rows: int
                 ) -> tuple[Optional[dict], Optional[str], Optional[str]]:
    """(the receipt's robustness summary, the server's card sha256, the binding) for `summary` (CardReader.summary,
    None: no card read) and `served`, the sha256 the purifier answered on each of the `rows` rows (None: the model
    does not report one, a config written before CARD_SHA256).

    VERIFIED: every row names the card the summary was read from. UNCHECKED: nothing to compare with; the figures
    stay, marked so. MISMATCH: the rows name another card, or not all the same one: the figures describe a card the
    server never checked, so only the gate status CARD_MISMATCH and both shas remain. The server's sha is None
    unless every row carries the same one. Without a summary nothing is shown, so there is nothing to bind (None)."""
    shas = sorted(set(served)) if served is not None else []
    server_sha = shas[0] if served is not None and len(served) == rows and len(shas) == 1 else None
    if summary is None:
        return None, server_sha, None
    if served is None:
        return {**summary, "card_binding": UNCHECKED}, None, UNCHECKED
    if server_sha is not None and server_sha == summary.get("card_sha256"):
        return {**summary, "card_binding": VERIFIED}, server_sha, VERIFIED
    return ({"gate": CARD_MISMATCH, "card_binding": MISMATCH, "card_sha256": summary.get("card_sha256"),
             "served_card_sha256": shas}, server_sha, MISMATCH)


CERTIFY_CARD_FILE = "certify_card.json"  # dbp.repository.CERTIFY_CARD_FILE


def certify_summary(card: dict, sigma: float) -> Optional[dict]:
    """The certification card's figures at `sigma` (experiments/certify/card.py's card.json), or None."""
    cfg = card.get("config") if isinstance(card.get("config"), dict) else {}
    bind = card.get("binding") if isinstance(card.get("binding"), dict) else {}
    for s in card.get("sigmas") or []:
        if not isinstance(s, dict) or _num(s.get("sigma")) is None or abs(float(s["sigma"]) - sigma) > 1e-6:
            continue
        acc = s.get("certified_accuracy") if isinstance(s.get("certified_accuracy"), dict) else {}
        rows = []
        for r, a in sorted(acc.items(), key=lambda kv: float(kv[0]) if _num_str(kv[0]) else 0.0):
            if _num_str(r) and isinstance(a, dict):
                rows.append({"radius": float(r), "accuracy": _num(a.get("acc")), "ci95": _ci(a.get("ci95"))})
        return {"sigma": sigma, "images": s.get("images") if isinstance(s.get("images"), int) else None,
                "n0": bind.get("n0", cfg.get("n0")), "n": bind.get("n", cfg.get("n")),
                "alpha": _num(bind.get("alpha", cfg.get("alpha"))), "certified_accuracy": rows,
                "abstain": s.get("abstain") if isinstance(s.get("abstain"), int) else None,
                "denoiser_sha256": bind.get("unet_sha256"), "classifier_sha256": bind.get("classifier_sha256"),
                "claim": card.get("claim") if isinstance(card.get("claim"), str) else None}
    return None


def _num_str(x: str) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


class CertifyCardReader:
    """The certify version's card (MODEL_REPOSITORY/<certify model>/N/certify_card.json), cached by mtime; the
    server loaded the version only if the card is bound to its weights (dbp.repository.check_certify_version)."""

    def __init__(self, repository: Optional[Path], model: str):
        self.repository = repository
        self.model = model
        self._cache: dict[int, tuple[float, Optional[dict]]] = {}

    def summary(self, version: int, sigma: float) -> Optional[dict]:
        if self.repository is None:
            return None
        path = self.repository / self.model / str(version) / CERTIFY_CARD_FILE
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        hit = self._cache.get(version)
        if not hit or hit[0] != mtime:
            try:
                card = json.loads(path.read_bytes())
                hit = (mtime, card if isinstance(card, dict) else None)
            except (OSError, ValueError) as e:
                log.warning("cannot read %s: %s", path, e)
                hit = (mtime, None)
            self._cache[version] = hit
        return certify_summary(hit[1], sigma) if hit[1] is not None else None
