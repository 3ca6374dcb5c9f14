"""Check a served version's robustness receipt yourself: signature, binding and the verdict recomputed from the
card's per-image evidence under the pinned policy (what the server does before loading a version).

  python -m training.verify model_repository/purifier/3                 # one version dir
  python -m training.verify model_repository                            # every version of every model
  python -m training.verify --card runs/gate/addt/card.json             # a card alone (signature + verdict)

Prints each rule with its figure and the diagnostics. Exit 0: every version named passes (legacy versions are
reported as legacy and exit 1); 1: something fails or is legacy; 2: bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from dbp import repository
from dbp.card import CardError, load_card
from dbp.gate.verdict import VerdictError, evaluate, summary_lines, verify


def version_dirs(path: Path) -> list[tuple[Path, str]]:
    """(version dir, role) for a version dir, a model dir or a whole repository."""
    if (path / repository.CARD_FILE).exists():
        return [(path, path.parent.name)]
    if (path / repository.CONFIG_FILE).exists():
        return [(repository.version_dir(path.parent, path.name, v), path.name) for v in repository.versions(path)]
    return [(repository.version_dir(path, role, v), role) for role in repository.ROLES
            for v in repository.versions(repository.model_dir(path, role))]


def check_one(vdir: Path, role: str) -> bool:
    try:
        card = repository.check_version(vdir, role)
    except repository.RepositoryError as e:
        print(f"REFUSED  {vdir}: {e}")
        return False
    status = card["gate_status"]
    print(f"{status['status'].upper():<8} {vdir}: {status.get('detail', '')}")
    if status["status"] == "legacy":
        print(f"         approved by {status['approver']} until {status['expires']}; fails:")
        for r in status["failed_rules"]:
            print(f"           - {r}")
        return False
    for line in summary_lines(evaluate(card)):
        print("         " + line)
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=repository.DEFAULT_REPO,
                   help="a version dir, a model dir or a model repository (default: %(default)s)")
    p.add_argument("--card", help="check a card file alone: its signature and its verdict")
    a = p.parse_args(argv)
    if a.card:
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
    ok = [check_one(d, role) for d, role in found]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
