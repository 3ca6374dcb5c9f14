"""dbp.config.parse_cli: preset < --config file < flags, type coercion, and errors that name the option."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import pytest

from dbp.config import ConfigError, from_dict, parse_cli, to_dict


@dataclass
class Cfg:
    name: str = "base"
    steps: int = 10
    lr: float = 0.1
    flip: bool = False
    dims: tuple[int, ...] = (1, 2)
    root: Optional[str] = None
    limit: int | None = None
    scale: Optional[float] = 1.5


PRESETS = {"smoke": dict(steps=3, name="smoke", lr=0.5), "wide": dict(dims=[4, 8, 16])}


def write_json(tmp_path, obj, name="cfg.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_defaults_without_arguments():
    assert parse_cli(Cfg, [], PRESETS) == Cfg()


def test_precedence_preset_then_file_then_flags(tmp_path):
    f = write_json(tmp_path, {"steps": 7, "lr": 0.25})
    cfg = parse_cli(Cfg, ["--steps", "99", "--config", f, "--preset", "smoke"], PRESETS)
    # flags beat the file, the file beats the preset, the preset beats the defaults; argv order is irrelevant
    assert (cfg.steps, cfg.lr, cfg.name, cfg.flip) == (99, 0.25, "smoke", False)
    assert parse_cli(Cfg, ["--preset", "smoke", "--config", f], PRESETS).steps == 7
    assert parse_cli(Cfg, ["--preset", "smoke"], PRESETS).steps == 3


def test_equals_form_dashes_and_negative_numbers():
    cfg = parse_cli(Cfg, ["--steps=4", "--lr", "-0.5", "--name=a=b"], PRESETS)
    assert (cfg.steps, cfg.lr, cfg.name) == (4, -0.5, "a=b")


@pytest.mark.parametrize("argv,value", [
    (["--flip"], True), (["--flip", "--steps", "2"], True), (["--flip", "false"], False), (["--flip=0"], False),
    (["--flip", "yes"], True), (["--flip", "off"], False), (["--flip", "True"], True),
])
def test_bool_coercion(argv, value):
    assert parse_cli(Cfg, argv).flip is value


def test_tuple_and_optional_coercion(tmp_path):
    cfg = parse_cli(Cfg, ["--dims", "3,5,7", "--root", "/data", "--limit", "12", "--scale", "none"])
    assert cfg.dims == (3, 5, 7) and all(isinstance(d, int) for d in cfg.dims)
    assert cfg.root == "/data" and cfg.limit == 12 and isinstance(cfg.limit, int) and cfg.scale is None
    assert parse_cli(Cfg, ["--limit", "null", "--root", "None"]).limit is None
    assert parse_cli(Cfg, ["--root", "None"]).root is None
    assert parse_cli(Cfg, ["--scale", "2"]).scale == 2.0
    # JSON gives lists, bools and numbers natively
    f = write_json(tmp_path, {"dims": [9], "flip": True, "limit": None, "lr": 1})
    cfg = parse_cli(Cfg, ["--config", f])
    assert cfg.dims == (9,) and cfg.flip is True and cfg.limit is None and cfg.lr == 1.0
    assert parse_cli(Cfg, ["--preset", "wide"], PRESETS).dims == (4, 8, 16)


def test_from_dict_and_to_dict_round_trip():
    cfg = parse_cli(Cfg, ["--preset", "smoke", "--dims", "2,3", "--limit", "4"], PRESETS)
    d = to_dict(cfg)
    assert json.loads(json.dumps(d))["dims"] == [2, 3]
    assert from_dict(Cfg, json.loads(json.dumps(d))) == cfg


def _error(capsys, argv, presets=PRESETS) -> str:
    with pytest.raises(ConfigError) as e:
        parse_cli(Cfg, argv, presets)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(e.value) in err  # printed, since SystemExit(2) alone would exit silently
    return str(e.value)


@pytest.mark.parametrize("argv,words", [
    (["--bogus", "1"], ["bogus", "known"]),
    (["--steps", "abc"], ["--steps", "int", "abc"]),
    (["--steps", "2.5"], ["--steps", "int"]),
    (["--lr", "fast"], ["--lr", "float"]),
    (["--flip", "maybe"], ["--flip", "boolean"]),
    (["--dims", "1,x"], ["--dims", "int"]),
    (["--limit", "many"], ["--limit", "int"]),
    (["--preset", "nope"], ["nope", "smoke", "wide"]),
    (["steps", "3"], ["steps", "unexpected"]),
    (["--steps"], ["--steps"]),  # a bare flag on a non-bool option
])
def test_errors_name_the_option(capsys, argv, words):
    msg = _error(capsys, argv)
    for w in words:
        assert w in msg, (w, msg)


def test_config_file_errors(tmp_path, capsys):
    assert "missing.json" in _error(capsys, ["--config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "bad.json" in _error(capsys, ["--config", str(bad)])
    assert "list" in _error(capsys, ["--config", write_json(tmp_path, [1, 2], "list.json")])
    assert "colour" in _error(capsys, ["--config", write_json(tmp_path, {"colour": 1}, "unk.json")])
    assert "--steps" in _error(capsys, ["--config", write_json(tmp_path, {"steps": 2.5}, "frac.json")])


def test_preset_without_presets(capsys):
    assert "fast" in _error(capsys, ["--preset", "fast"], None)


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(Cfg, ["--help"], PRESETS, prog="prog.py")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "prog.py" in out and "--steps" in out and "smoke" in out
