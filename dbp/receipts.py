"""Receipts: a saved /classify or /purify response names the card that served it (card_sha256). This module
reads one, finds that card in a repository and compares the figures the receipt shows with the card's; the CLI is
`python -m training.verify model_repository --receipt FILE`. Torch-free."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from .repository import (CONFIG_FILE, DEFAULT_PROFILE, RepositoryError, card_path, model_dir, profile_settings,
                         version_dir, versions)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# the gateway's gate status and binding when it withheld the figures (service/app/cards.py CARD_MISMATCH, MISMATCH)
WITHHELD_GATE, WITHHELD_BINDING = "card_mismatch", "mismatch"


class ReceiptError(ValueError):
    """A receipt is not a /classify or /purify response this module can read; the message names the field."""


def read_receipt(receipt: Any) -> dict[str, Any]:
    """{"version", "profile", "card_sha256", "robustness"} of a saved /classify or /purify response (the fields of
    service/app/schemas.py: model.purifier_version, profile.name, card_sha256, robustness). card_sha256 is None
    when the receipt carries none (a server older than the card binding, or a model config that does not report
    CARD_SHA256): such a receipt cannot be bound to a card. ReceiptError for anything malformed."""
    from .serving.contract import _PROFILE_NAME

    if not isinstance(receipt, dict):
        raise ReceiptError("a receipt is a JSON object (a /classify or /purify response), not "
                           f"{type(receipt).__name__}")
    model, profile = receipt.get("model"), receipt.get("profile")
    version = model.get("purifier_version") if isinstance(model, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ReceiptError(f"model.purifier_version: expected a version number, got {version!r}")
    name = profile.get("name") if isinstance(profile, dict) else None
    if not isinstance(name, str) or not (name == DEFAULT_PROFILE or _PROFILE_NAME.match(name)):
        # the name becomes a path (card_path): only a profile name the server could have declared is read
        raise ReceiptError(f"profile.name: expected a serving profile name, got {name!r}")
    sha = receipt.get("card_sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        raise ReceiptError(f"card_sha256: expected 64 lowercase hex digits or null, got {sha!r}")
    robustness = receipt.get("robustness")
    if robustness is not None and not isinstance(robustness, dict):
        raise ReceiptError(f"robustness: expected an object or null, got {type(robustness).__name__}")
    return {"version": version, "profile": name, "card_sha256": sha, "robustness": robustness}


def receipt_card(repo: str | Path, receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The card `repo` holds for a read_receipt's purifier version and profile: {"version_dir", "path", "sha256",
    "card"} (card: the parsed JSON, None if it does not parse), sha256 and card from one read of the file, so
    what is compared with the receipt is what the figures are read from. RepositoryError when the repository has
    no such version, its config.pbtxt declares no such profile, or the profile has no card."""
    repo = Path(repo)
    version, profile = receipt["version"], receipt["profile"]
    vdir = version_dir(repo, "purifier", version)
    if not vdir.is_dir():
        raise RepositoryError(f"{repo} has no purifier version {version} (it has: "
                              f"{', '.join(map(str, versions(model_dir(repo, 'purifier')))) or 'none'})")
    if (vdir.parent / CONFIG_FILE).exists() and profile not in profile_settings(repo):
        raise RepositoryError(f"{vdir.parent / CONFIG_FILE} declares no serving profile {profile!r}")
    path = card_path(vdir, profile)
    try:
        raw = path.read_bytes()
    except OSError:
        raise RepositoryError(f"{vdir} has no card for profile {profile!r} ({path.name} missing)") from None
    try:
        card = json.loads(raw)
    except ValueError:
        card = None
    return {"version_dir": vdir, "path": path, "sha256": hashlib.sha256(raw).hexdigest(),
            "card": card if isinstance(card, dict) else None}


def shown_figures(card: Mapping[str, Any]) -> dict[str, Any]:
    """The figures a receipt's robustness summary shows for a card: {"clean_accuracy", "settings": [[name,
    robust_accuracy], ...]} read as the gateway reads them (service/app/cards.py summarize: the purified clean
    accuracy; per setting the worst case over the attacks, else the single attack's; then the served-VOTES rows).
    The gateway imports no dbp, so tests/test_verify.py ties the two readings on the committed cards."""
    def num(x: Any) -> Optional[float]:
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    def sub(d: Any, key: str) -> dict:
        return d.get(key) if isinstance(d, dict) and isinstance(d.get(key), dict) else {}

    settings = []
    for s in card.get("settings") or []:
        if isinstance(s, dict):
            robust = next((s[k] for k in ("worst_case", "robust") if isinstance(s.get(k), dict)), {})
            settings.append([str(s.get("name", "?")), num(robust.get("acc"))])
    for r in sub(card, "served_votes").get("rows") or []:
        if isinstance(r, dict):
            settings.append([str(r.get("name", "?")), num(sub(r, "robust").get("acc"))])
    return {"clean_accuracy": num(sub(sub(card, "clean"), "purified").get("acc")), "settings": settings}


def receipt_figure_differences(robustness: Optional[Mapping[str, Any]], card: Mapping[str, Any]
                               ) -> Optional[list[str]]:
    """How a receipt's robustness figures differ from the card's (shown_figures): [] when they are equal; None
    when the receipt shows none to compare (no summary: the gateway had no repository; or withheld: the gateway's
    copy of the card was not the one the server checked, WITHHELD_GATE)."""
    if robustness is None:
        return None
    if robustness.get("gate") == WITHHELD_GATE or robustness.get("card_binding") == WITHHELD_BINDING:
        # withheld means no figures at all: a withheld summary that still shows some is compared like any other
        if robustness.get("clean_accuracy") is None and not robustness.get("settings"):
            return None
    want = shown_figures(card)
    got_settings = [[s.get("setting"), s.get("robust_accuracy")] if isinstance(s, dict) else [None, None]
                    for s in (robustness.get("settings") if isinstance(robustness.get("settings"), list) else [])]
    diffs = []
    if robustness.get("clean_accuracy") != want["clean_accuracy"]:
        diffs.append(f"clean accuracy {robustness.get('clean_accuracy')} on the receipt, "
                     f"{want['clean_accuracy']} on the card")
    if [s[0] for s in got_settings] != [s[0] for s in want["settings"]]:
        diffs.append(f"settings {[s[0] for s in got_settings]} on the receipt, {[s[0] for s in want['settings']]} "
                     "on the card")
    else:
        diffs += [f"{name} robust accuracy {got} on the receipt, {card_acc} on the card"
                  for (name, got), (_, card_acc) in zip(got_settings, want["settings"]) if got != card_acc]
    return diffs
