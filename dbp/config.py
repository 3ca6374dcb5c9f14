"""Small dataclass configs with presets, a JSON file and `--key value` overrides; saved with every artifact."""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

C = TypeVar("C")


class ConfigError(SystemExit):
    """A bad command line or config file: exits 2 with a message naming the problem."""

    def __init__(self, msg: str):
        super().__init__(f"error: {msg}")
        self.code = 2
        # Python prints a SystemExit's message only when its code is not an int, so say it here
        print(f"error: {msg}", file=sys.stderr, flush=True)


def _coerce(name: str, typ: Any, raw: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        typ = args[0]
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} expects a boolean, got {raw!r}")
    if typ is int and isinstance(raw, float) and not raw.is_integer():
        raise ConfigError(f"--{name} expects int, got {raw!r}")  # int(2.5) would silently truncate
    if typ in (int, float, str):
        try:
            return typ(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} expects {typ.__name__}, got {raw!r}") from None
    if typing.get_origin(typ) in (tuple, list):
        items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",") if s]
        (inner, *_) = typing.get_args(typ) or (str,)
        return tuple(_coerce(name, inner, i) for i in items)
    return raw


def from_dict(cls: type[C], values: Mapping[str, Any], base: C | None = None) -> C:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    cfg = base if base is not None else cls()
    return dataclasses.replace(cfg, **{k: _coerce(k, hints[k], v) for k, v in values.items()})


def parse_cli(cls: type[C], argv: Sequence[str] | None = None, presets: Mapping[str, Mapping[str, Any]] | None = None,
              prog: str | None = None) -> C:
    """`--preset NAME` first, then `--config file.json`, then `--key value` / `--key=value` / `--flag`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        fields = "\n".join(f"  --{f.name} ({typing.get_type_hints(cls)[f.name]}) default {f.default!r}"
                           for f in dataclasses.fields(cls))
        print(f"usage: {prog or sys.argv[0]} [--preset {{{','.join(presets or {})}}}] [--config FILE] [--key value ...]"
              f"\n{fields}")
        raise SystemExit(0)
    pairs: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r} (options look like --key value)")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            else:
                val = "true"  # a bare flag such as --no_rbgm
        pairs[key] = val
        i += 1
    cfg = cls()
    preset = pairs.pop("preset", None)
    if preset is not None:
        if not presets or preset not in presets:
            raise ConfigError(f"unknown preset {preset!r}; known: {sorted(presets or {})}")
        cfg = from_dict(cls, presets[preset], cfg)
    cfg_file = pairs.pop("config", None)
    if cfg_file is not None:
        try:
            values = json.loads(Path(cfg_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config file {cfg_file}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {cfg_file} must hold a JSON object of options, got {type(values).__name__}")
        cfg = from_dict(cls, values, cfg)
    return from_dict(cls, pairs, cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
