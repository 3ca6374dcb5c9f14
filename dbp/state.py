"""Resumable state on disk, written once: atomic writes, and the check that saved results belong to the same
evaluation as now (the role of AutoAttack's EvaluationState): the gate's per-batch state and convergence points,
the learning curve's cache and the cards all use these.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional


class StateMismatch(ValueError):
    """Saved results were computed under another configuration; the message names every differing key."""


def save_atomic(path: str | Path, save: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """`save(tmp)` writes a temporary file beside `path`, which then replaces it: a reader (or a run killed
    mid-write) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save(Path(tmp))
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    return save_atomic(path, lambda tmp: tmp.write_text(text), fsync=fsync)


def write_json(path: str | Path, obj: Any, *, indent: Optional[int] = 2, default=None, fsync: bool = False,
               newline: bool = False) -> Path:
    text = json.dumps(obj, indent=indent, default=default) + ("\n" if newline else "")
    return write_text(path, text, fsync=fsync)


def differences(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """'key: saved X vs now Y' for every key whose value differs (missing keys included)."""
    return [f"{k}: saved {have.get(k)!r} vs now {want.get(k)!r}" for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)]


def require_same(have: Optional[Mapping[str, Any]], want: Mapping[str, Any], where: str | Path, hint: str,
                 error: type[Exception] = StateMismatch) -> None:
    """Raise `error` when `where` holds results of another evaluation than `want` (None: it records none)."""
    if have is None:
        raise error(f"{where} does not record the configuration of its results (an older run); {hint}")
    diff = differences(have, want)
    if diff:
        raise error(f"{where} holds results of a different evaluation ({', '.join(diff)}); {hint}")
