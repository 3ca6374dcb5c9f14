"""dbp.state: atomic writes and the saved-vs-now check every resumable run uses."""
from __future__ import annotations

import json

import pytest

from dbp import state


def test_an_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    f = tmp_path / "d" / "r.json"
    state.write_json(f, {"a": 1})
    def broken(tmp):
        tmp.write_text("{half")
        raise KeyboardInterrupt  # a kill mid-write
    with pytest.raises(KeyboardInterrupt):
        state.save_atomic(f, broken)
    assert json.loads(f.read_text()) == {"a": 1}
    assert [p.name for p in f.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_require_same_names_every_difference(tmp_path):
    state.require_same({"seed": 0, "n": 8}, {"seed": 0, "n": 8}, tmp_path, "hint")
    with pytest.raises(state.StateMismatch, match=r"n: saved 8 vs now 16, seed: saved 0 vs now 1\); use another"):
        state.require_same({"seed": 0, "n": 8}, {"seed": 1, "n": 16}, tmp_path, "use another --out_dir")
    with pytest.raises(KeyError, match="does not record the configuration"):
        state.require_same(None, {"seed": 0}, tmp_path, "hint", KeyError)
    with pytest.raises(state.StateMismatch, match="extra: saved None vs now 1"):
        state.require_same({}, {"extra": 1}, tmp_path, "hint")
