"""experiments.samplers.compare (issue 22 item 3) on the tiny models: 4 images, 2 PGD steps.

The two "models" are the same checkpoint, so with the same images and noise every paired difference must be
exactly zero; the ddim-addt unit taken from the sweep's served point must equal the one measured here; a rerun
measures nothing; another configuration is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbp.state import StateMismatch
from experiments.samplers import compare
from experiments.sweeps import purification_sweep as sweep

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n_images", "4", "--n_eot", "2", "--k", "2", "--steps", "2", "--eot", "2", "--batch", "4",
         "--latency_reps", "1", "--latency_batch", "4"]


def args(cls, diff, out, *extra):
    return ["--addt", str(diff), "--base", str(diff), "--classifier", str(cls), "--repository",
            str(ROOT / "model_repository"), *SMALL, "--out", str(out), *extra]


def test_sampler_comparison(tiny_classifier_ckpt, tiny_diffusion_ckpt, tmp_path, monkeypatch):
    cls, diff = tiny_classifier_ckpt, tiny_diffusion_ckpt
    out, sw, copy = tmp_path / "samplers", tmp_path / "sweep", tmp_path / "docs"
    sweep.main(["--purifier", str(diff), "--classifier", str(cls), "--repository", str(ROOT / "model_repository"),
                *SMALL, "--points", "t100-n100", "--out", str(sw)])
    compare.main(args(cls, diff, out, "--units", "ddim,edm", "--sweep", str(sw), "--copy", "--copy_to", str(copy)))
    units = {u: json.loads((out / "units" / f"{u}.json").read_text()) for u in ("ddim-addt", "ddim-base", "edm-addt")}
    assert units["ddim-addt"]["taken_from"].endswith("t100-n100.json")
    assert "taken_from" not in units["ddim-base"]
    # measured here (ddim-base: the same weights) == borrowed from the sweep, image by image
    for c in ("clean", "dwbox_linf_8_255", "eot_linf_8_255"):
        assert units["ddim-base"]["results"][c]["per_image"] == units["ddim-addt"]["results"][c]["per_image"], c
    assert units["edm-addt"]["unit"]["unet_calls"] == 11 and units["edm-addt"]["unit"]["s_churn"] == 0.0
    doc = json.loads((out / "samplers.json").read_text())
    assert set(doc["paired"]) == {"ddim", "edm"}
    for s, p in doc["paired"].items():
        for c in ("clean", "dwbox_linf_8_255", "eot_linf_8_255"):
            assert p[c]["diff"] == 0 and p[c]["p_value"] == 1.0, (s, c)
    vs = doc["addt_vs_served_sampler"]  # edm against ddim, both on the "ADDT" weights: counts add up to n
    assert set(vs) == {"edm"} and vs["edm"]["dwbox_linf_8_255"]["n"] == 4
    q = vs["edm"]["dwbox_linf_8_255"]
    edm, ddim = (units[u]["results"]["dwbox_linf_8_255"]["per_image"] for u in ("edm-addt", "ddim-addt"))
    assert q["only_sampler_right"] == sum(a >= .5 > b for a, b in zip(edm, ddim))
    assert q["only_served_right"] == sum(b >= .5 > a for a, b in zip(edm, ddim))
    md = (copy / "samplers.md").read_text()
    assert "## Each sampler against the served one (ddim)" in md and "| edm |" in md
    assert "| ddpm | 11 | not run yet" in md and "| edm | 11 | " in md and "+0.0" in md
    assert (copy / "samplers.png").read_bytes()[:4] == b"\x89PNG"

    calls = []
    monkeypatch.setattr(sweep, "measure", lambda name, *a, **k: calls.append(name))
    compare.main(args(cls, diff, out, "--units", "ddim,edm", "--sweep", str(sw)))
    assert calls == []
    with pytest.raises(StateMismatch, match="steps"):
        compare.main(args(cls, diff, out, "--steps", "3"))
    with pytest.raises(SystemExit, match="unknown --units"):
        compare.main(args(cls, diff, out, "--units", "heun"))
