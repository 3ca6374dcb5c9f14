"""Serving profiles' cards: attach a profile's robustness card to a published version, list what a version serves.

A serving profile is a named purification setting of the purifier (config.pbtxt `profiles`; "default" is the
top-level t_star / sampler / num_inference_steps, whose card is the version's robustness_card.json, written by
export). Every other profile is served by a version only with its own card, <version>/cards/<profile>.json, which
the server checks with dbp.repository.check_version (signed and passing the pinned policy, bound to the version's
weights and to that profile's settings; or named in legacy.json with "profile" and the card's sha256). This CLI runs
that same check before it copies the card in, atomically:

  # measure the card on exactly the profile's pinned settings (training.gate reads them from config.pbtxt)
  python -m training.gate --repository model_repository --version 2 --profile fast --preset cpu --out_dir runs/gate/v2-fast
  python -m training.profiles add --repository model_repository --version 2 --profile fast --card runs/gate/v2-fast/card.json
  python -m training.profiles list --repository model_repository --version 2
  # a card that does not pass can only come in through the legacy list: print its entry (with the rules it
  # fails), review it, add it to model_repository/legacy.json by hand, then run `add`
  python -m training.profiles legacy-entry --repository model_repository --version 2 --profile fast \
      --card runs/gate/v2-fast/card.json --approver "..." --expires 2027-01-31 --reason "..."

A running Triton serves the new profile once it reloads the version (a polling server does so by itself; else
restart it or load the model again). Exit codes: 0 done; 1 the card is refused (the reason on stderr); 2 bad input.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Optional, Sequence

from dbp import repository

ROLE = "purifier"


def _version_dir(repo: Path, version: int) -> Path:
    d = repository.version_dir(repo, ROLE, version)
    if not (d / repository.WEIGHTS_DIR).is_dir():
        raise repository.RepositoryError(f"{d} is not a published {ROLE} version (no {repository.WEIGHTS_DIR}/)")
    return d


def _profile(repo: Path, profile: str) -> dict:
    table = repository.profile_settings(repo)
    if profile == repository.DEFAULT_PROFILE:
        raise repository.RepositoryError("the default profile's card is the version's robustness_card.json, "
                                         "written by `python -m training.export`")
    if profile not in table:
        raise repository.RepositoryError(f"{repository.model_dir(repo, ROLE) / repository.CONFIG_FILE} declares no "
                                         f"profile {profile!r} (declared: {', '.join(table)})")
    return table[profile]


def add(repo: str | Path, version: int, profile: str, card: str | Path, log=print) -> Path:
    """Check `card` as the server will (dbp.repository.check_version for this profile) and copy it to
    <version>/cards/<profile>.json atomically; returns that path. RepositoryError if refused."""
    repo = Path(repo)
    vdir = _version_dir(repo, version)
    settings = _profile(repo, profile)
    data = Path(card).read_bytes()  # read once: what is checked is exactly what is attached
    dst = repository.card_path(vdir, profile)
    with repository.repo_lock(repo):
        dst.parent.mkdir(exist_ok=True)
        tmp = dst.parent / f".{profile}-{secrets.token_hex(4)}.json"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # the server's check on the temp copy (purification: repository.purification_settings, i.e. the
            # profile's settings and the served max_votes); the legacy list names the card by these bytes' sha256
            checked = repository.check_version(vdir, ROLE, profile=profile, card=tmp)
            os.replace(tmp, dst)
            fd = os.open(dst.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)
    status = checked["gate_status"]
    log(f"attached {dst} ({status['status']}: {status.get('detail', '')}); profile {profile!r} = {settings}")
    return dst


def legacy_entry(repo: str | Path, version: int, profile: str, card: str | Path, approver: str, expires: str,
                 reason: str) -> dict:
    """The legacy.json entry that would let `card` serve `profile` of `version` although it does not pass: bound
    to the weights and the profile's settings (else no entry helps), with the rules it fails."""
    from dbp.card import card_bound_to, card_failures

    repo = Path(repo)
    vdir = _version_dir(repo, version)
    if profile not in repository.profile_settings(repo):
        raise repository.RepositoryError(f"the purifier's config.pbtxt declares no profile {profile!r}")
    settings = repository.purification_settings(repo, profile)
    weights = {ROLE: vdir / repository.WEIGHTS_DIR}
    bound, why = card_bound_to(card, weights, settings)
    if not bound:
        raise repository.RepositoryError(f"no legacy entry can serve this card: {why}")
    failed = card_failures(card, weights, settings)  # every check it fails, not only the first
    if not failed:
        raise repository.RepositoryError("the card passes: attach it with `add`, no legacy entry needed")
    entry = {"model": ROLE, "version": version, "card_sha256": hashlib.sha256(Path(card).read_bytes()).hexdigest(),
             "failed_rules": failed, "approver": approver, "expires": expires, "reason": reason}
    if profile != repository.DEFAULT_PROFILE:
        entry = {"model": ROLE, "version": version, "profile": profile, **{k: v for k, v in entry.items()
                                                                          if k not in ("model", "version")}}
    return entry


def describe(repo: str | Path, version: int) -> list[dict]:
    """Per declared profile: its settings and whether this version would serve it (and why not)."""
    repo = Path(repo)
    vdir = _version_dir(repo, version)
    rows = []
    for name, settings in repository.profile_settings(repo).items():
        try:
            status = repository.check_version(vdir, ROLE, profile=name)["gate_status"]["status"]
            why = None
        except repository.RepositoryError as e:
            status, why = "not served", str(e)
        rows.append({"profile": name, "settings": settings, "card": str(repository.card_path(vdir, name)
                                                                        .relative_to(repo)),
                     "status": status, "why": why})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.profiles", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repository", default=str(repository.default_repository()))
    common.add_argument("--version", type=int, required=True)
    a = sub.add_parser("add", parents=[common], help="check a profile's card and copy it into the version")
    a.add_argument("--profile", required=True)
    a.add_argument("--card", required=True)
    le = sub.add_parser("legacy-entry", parents=[common], help="print the legacy.json entry for a card that fails")
    le.add_argument("--profile", required=True)
    le.add_argument("--card", required=True)
    le.add_argument("--approver", required=True)
    le.add_argument("--expires", required=True, help="YYYY-MM-DD")
    le.add_argument("--reason", required=True)
    sub.add_parser("list", parents=[common], help="the declared profiles and whether the version serves each")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "add":
            if not Path(args.card).is_file():
                print(f"error: no card at {args.card}", file=sys.stderr)
                return 2
            add(args.repository, args.version, args.profile, args.card)
        elif args.cmd == "legacy-entry":
            print(json.dumps(legacy_entry(args.repository, args.version, args.profile, args.card, args.approver,
                                          args.expires, args.reason), indent=2))
        else:
            print(json.dumps(describe(args.repository, args.version), indent=2))
    except repository.RepositoryError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
