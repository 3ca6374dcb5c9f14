"""Check a served version's robustness receipt yourself: signature, binding and the verdict recomputed from the
card's per-image evidence under the pinned policy (what the server does before loading a version).

  python -m training.verify model_repository/purifier/3                 # one version dir, every serving profile
  python -m training.verify model_repository/purifier/3 --profile fast  # one serving profile's card
  python -m training.verify model_repository                            # every version of every model
  python -m training.verify --card runs/gate/addt/card.json             # a card alone (signature + verdict)
  python -m training.verify model_repository --receipt receipt.json     # a saved /classify or /purify response

With --receipt (a file, or - for stdin) the version, serving profile and card_sha256 come from the receipt: the
repository's card for that version and profile must be the very card the receipt names (sha256), it gets the same
check as a version's profile, and the receipt's robustness figures must be the card's (dbp.receipts:
read_receipt, receipt_card, receipt_figure_differences). A receipt without card_sha256 (an older server) cannot
be bound to a card and fails; so does one naming another card, or a version or profile the repository lacks.

For a purifier version, every serving profile its config.pbtxt declares is checked, each with the card the server
would serve it with (dbp.repository.card_path: robustness_card.json for "default", cards/<profile>.json else) under
the server's own rule (dbp.repository.check_version); one line per profile: PASSED, LEGACY (with the rules its card
fails), REFUSED (a card that exists but is invalid: bad signature, evidence that does not recompute, bound to other
weights or settings) or NOT SERVED (a declared profile without a card: a valid state, the server serves the version
without it). Every declared profile's settings are checked as the server loads them (dbp.diffusion's
Diffusion.check_settings, through Purifier): one it refuses (e.g. a t_star off the num_inference_steps grid) and
the whole version is REFUSED, naming the profile, since the server does not load it at all. Prints each rule with
its figure and the diagnostics, and the sha256 of each card it read (what a receipt's card_sha256 names).

Exit 0: every version named passes (legacy versions are reported as legacy and exit 1); 1: some card is refused
or legacy, or a version does not load (a profile without a card is no failure by itself; a version without its
default card, or with a declared profile's settings dbp.diffusion refuses, is refused); 2:
bad input (an undeclared --profile among them, a malformed receipt).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from dbp import receipts, repository
from dbp.card import CardError, load_card
from dbp.gate.verdict import VerdictError, evaluate, summary_lines, verify

PASSED, LEGACY, REFUSED, NOT_SERVED = "passed", "legacy", "refused", "not served"
PURIFIER = "purifier"  # the model whose config.pbtxt declares serving profiles


def version_dirs(path: Path) -> list[tuple[Path, str]]:
    """(version dir, role) for a version dir, a model dir or a whole repository."""
    if (path / repository.CARD_FILE).exists():
        return [(path, path.parent.name)]
    if (path / repository.CONFIG_FILE).exists():
        return [(repository.version_dir(path.parent, path.name, v), path.name) for v in repository.versions(path)]
    return [(repository.version_dir(path, role, v), role) for role in repository.ROLES
            for v in repository.versions(repository.model_dir(path, role))]


def declared_profiles(vdir: Path, role: str) -> list[str]:
    """The serving profiles a version is served under: for a purifier, the ones its config.pbtxt declares
    (dbp.repository.profile_settings, "default" first); any other model has only "default". RepositoryError for a
    malformed `profiles` (the server does not load the model then)."""
    if role != PURIFIER or not (vdir.parent / repository.CONFIG_FILE).exists():
        return [repository.DEFAULT_PROFILE]
    return list(repository.profile_settings(vdir.parent.parent))


def settings_errors(vdir: Path, role: str) -> list[str]:
    """"profile <name>: <reason>" for each declared serving profile whose settings dbp.diffusion refuses
    (Diffusion.check_settings, what Purifier calls for every declared profile when the server loads the version:
    one bad profile and the whole version does not load, card or not); [] for any other model. RepositoryError
    for a malformed `profiles`."""
    if role != PURIFIER or not (vdir.parent / repository.CONFIG_FILE).exists():
        return []
    from dbp.diffusion import Diffusion  # torch: only for a purifier version

    diffusion = Diffusion()  # the schedule Purifier builds
    errors = []
    for name, p in repository.profile_settings(vdir.parent.parent).items():
        try:
            diffusion.check_settings(p["sampler"], p["t_star"], p["num_inference_steps"])
        except ValueError as e:
            errors.append(f"profile {name}: {e}")
    return errors


def check_profile(vdir: Path, role: str, profile: str = repository.DEFAULT_PROFILE) -> dict[str, Any]:
    """One profile's result under the server's rule (dbp.repository.check_version with that profile, on the card
    dbp.repository.card_path names): {"version", "model", "profile", "card", "status", "ok", "detail"}, plus
    "failed_rules" / "approver" / "expires" for a legacy card and "summary" (the rules with their figures) for a
    passing one. status: passed, legacy, refused (a card that exists is invalid, or the default card is missing:
    the version does not load) or not served (a declared profile other than "default" without a card). ok: no
    failure (passed or not served)."""
    row: dict[str, Any] = {"version": str(vdir), "model": role, "profile": profile}
    try:
        path = repository.card_path(vdir, profile)
        row["card"] = str(path)
        checked = repository.check_version(vdir, role, profile=profile)
    except repository.RepositoryError as e:
        missing = profile != repository.DEFAULT_PROFILE and "card" in row and not Path(row["card"]).exists()
        if "card" in row and not missing:
            row["card_sha256"] = file_sha256(Path(row["card"]))
        return {**row, "status": NOT_SERVED if missing else REFUSED, "ok": missing, "detail": str(e)}
    status = checked["gate_status"]
    row.update(status=status["status"], ok=status["status"] == PASSED, detail=status.get("detail", ""),
               card_sha256=status.get("card_sha256"))  # of the bytes check_version checked, not a second read
    if status["status"] == LEGACY:
        row.update({k: status[k] for k in ("failed_rules", "approver", "expires")})
    else:
        row["summary"] = summary_lines(evaluate(checked))
    return row


def file_sha256(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check_version(vdir: Path, role: str, profile: Optional[str] = None) -> list[dict[str, Any]]:
    """One check_profile result per declared profile of the version ("default" first), or for `profile` alone;
    a single refused row for the whole version when the server would not load it (a malformed `profiles`, or a
    declared profile's settings that dbp.diffusion refuses), whichever profile is asked for."""
    try:
        names = [profile] if profile is not None else declared_profiles(vdir, role)
        errors = settings_errors(vdir, role)
    except repository.RepositoryError as e:  # a malformed `profiles`: the server refuses the whole model
        return [{"version": str(vdir), "model": role, "profile": repository.DEFAULT_PROFILE, "status": REFUSED,
                 "ok": False, "detail": str(e)}]
    if errors:  # the server builds a Purifier per declared profile: one refused setting fails the whole load
        return [{"version": str(vdir), "model": role, "profile": repository.DEFAULT_PROFILE, "status": REFUSED,
                 "ok": False, "detail": "the server refuses to load this version: " + "; ".join(errors)}]
    rows = [check_profile(vdir, role, name) for name in names]
    if profile is None and role == PURIFIER and (vdir / repository.CARDS_DIR).is_dir():
        for f in sorted((vdir / repository.CARDS_DIR).glob("*.json")):
            if f.stem not in names:  # a card for a profile config.pbtxt does not declare: never served
                rows.append({"version": str(vdir), "model": role, "profile": f.stem, "card": str(f),
                             "status": NOT_SERVED, "ok": True,
                             "detail": f"{repository.CONFIG_FILE} declares no profile {f.stem!r}; its card is unused"})
    return rows


def print_row(row: dict[str, Any]) -> None:
    vdir, profile = row["version"], row["profile"]
    where = vdir if profile == repository.DEFAULT_PROFILE else f"{vdir} profile {profile}"
    sha = f"card sha256 {row['card_sha256']}; " if row.get("card_sha256") else ""
    print(f"{row['status'].upper():<8} {where}: {sha}{row['detail']}")
    if row["status"] == LEGACY:
        print(f"         approved by {row['approver']} until {row['expires']}; fails:")
        for r in row["failed_rules"]:
            print(f"           - {r}")
    for line in row.get("summary", []):
        print("         " + line)


def check_one(vdir: Path, role: str, profile: Optional[str] = None) -> bool:
    """Print one version's results (every declared profile, or `profile`); True when none failed."""
    return print_rows(check_version(vdir, role, profile))


def print_rows(rows: list[dict[str, Any]]) -> bool:
    default = next((r for r in rows if r["profile"] == repository.DEFAULT_PROFILE), None)
    for row in rows:
        print_row(row)
        if row is default and row["status"] == REFUSED and len(rows) > 1:
            print("         the version does not load without a valid default card: none of its profiles is served")
    return all(r["ok"] for r in rows)


def check_receipt(repo: Path, source: str) -> int:
    """Check a saved receipt against `repo` (see the module docstring): 0 bound and passed, 1 failed (a one-line
    reason last), 2 a receipt that cannot be read."""
    try:
        receipt = receipts.read_receipt(json.loads(sys.stdin.read() if source == "-" else Path(source).read_text()))
    except (OSError, ValueError) as e:  # JSONDecodeError and ReceiptError are ValueErrors
        print(f"error: receipt {source}: {e}", file=sys.stderr)
        return 2
    if not repository.model_dir(repo, PURIFIER).is_dir():
        print(f"error: {repo} is not a model repository (no {PURIFIER}/)", file=sys.stderr)
        return 2
    what = f"receipt {source} (purifier version {receipt['version']}, profile {receipt['profile']})"

    def failed(reason: str) -> int:
        print(f"FAILED   {what}: {reason}")
        return 1

    if receipt["card_sha256"] is None:
        return failed("it carries no card_sha256 (a server older than the card binding, or a model config that does "
                      "not report CARD_SHA256), so it cannot be bound to a card")
    try:
        found = receipts.receipt_card(repo, receipt)
    except repository.RepositoryError as e:
        return failed(str(e))
    if found["sha256"] != receipt["card_sha256"]:
        return failed(f"it names card sha256 {receipt['card_sha256']}, but the repository's card {found['path']} "
                      f"has sha256 {found['sha256']}")
    print(f"BOUND    {what}: card sha256 {found['sha256']} is {found['path']}")
    rows = check_version(found["version_dir"], PURIFIER, receipt["profile"])
    if receipt["profile"] != repository.DEFAULT_PROFILE:
        # the server loads no profile of a version whose default card it refuses: check that one too
        rows += check_version(found["version_dir"], PURIFIER, repository.DEFAULT_PROFILE)
    print_rows(rows)
    # only PASSED: NOT_SERVED counts as ok for a version's listing, but here it means the card vanished meanwhile
    ok = all(r["status"] == PASSED for r in rows)
    checked = rows[0].get("card_sha256")
    if checked is not None and checked != found["sha256"]:  # the file changed between the two reads
        return failed(f"the card changed while it was checked (sha256 {found['sha256']}, then {checked})")
    diffs = receipts.receipt_figure_differences(receipt["robustness"], found["card"] or {})
    if diffs is None:
        print("FIGURES  none on the receipt to compare (no robustness summary, or withheld by the gateway)")
    elif diffs:
        print(f"FIGURES  differ from the card: {'; '.join(diffs)}")
    else:
        n = len((receipt["robustness"] or {}).get("settings") or [])
        print(f"FIGURES  equal to the card's: clean accuracy and {n} settings' robust accuracy")
    if not ok:
        bad = next(r for r in rows if r["status"] != PASSED)
        which = "its card" if bad is rows[0] else "the version's default card"
        return failed(f"the check of {which} above says {bad['status']}, not passed")
    if diffs:
        return failed("its robustness figures are not the card's")
    print(f"PASSED   {what}: served with a card that passes")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=repository.DEFAULT_REPO,
                   help="a version dir, a model dir or a model repository (default: %(default)s)")
    p.add_argument("--card", help="check a card file alone: its signature and its verdict")
    p.add_argument("--receipt", metavar="FILE", help="a saved /classify or /purify response (- for stdin): check "
                   "that the repository's card for its version and profile is the card it names, and that card")
    p.add_argument("--profile", help="check only this serving profile's card (one the purifier's config.pbtxt "
                                     "declares; default: every declared profile)")
    a = p.parse_args(argv)
    if a.receipt:
        if a.card or a.profile:
            print("error: --receipt names its version, profile and card itself", file=sys.stderr)
            return 2
        return check_receipt(Path(a.path), a.receipt)
    if a.card:
        if a.profile:
            print("error: --card checks a card alone; --profile names a version's card", file=sys.stderr)
            return 2
        try:
            card = load_card(a.card)
        except CardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            v = verify(card)
        except VerdictError as e:
            v = evaluate(card)
            print(f"FAILED   {a.card}: {e}")
            for line in summary_lines(v):
                print("         " + line)
            return 1
        print(f"PASSED   {a.card}: signed by {v['signed_by']}, policy {v['policy_sha256'][:12]}")
        for line in summary_lines(v):
            print("         " + line)
        return 0
    path = Path(a.path)
    found = version_dirs(path) if path.is_dir() else []
    if not found:
        print(f"error: {path} holds no version with a {repository.CARD_FILE}", file=sys.stderr)
        return 2
    if a.profile and a.profile != repository.DEFAULT_PROFILE:  # profiles are the purifier's
        found = [(d, role) for d, role in found if role == PURIFIER]
        if not found:
            print(f"error: {path} holds no {PURIFIER} version; serving profiles are the {PURIFIER}'s",
                  file=sys.stderr)
            return 2
    if a.profile:
        for d, role in found:
            try:
                declared = declared_profiles(d, role)
            except repository.RepositoryError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            if a.profile not in declared:
                print(f"error: {d.parent / repository.CONFIG_FILE} declares no profile {a.profile!r} (declared: "
                      f"{', '.join(declared)})", file=sys.stderr)
                return 2
    ok = [check_one(d, role, a.profile) for d, role in found]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
