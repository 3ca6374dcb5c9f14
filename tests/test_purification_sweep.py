"""experiments.sweeps.purification_sweep (issue 22 item 4) on the tiny models: two points, 4 images, 2 PGD steps.
A finished point is skipped on rerun and a half-finished one resumes at its first missing measurement; another
configuration in the same directory is refused; the JSON, the table and both figures are written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbp.models import load_unet
from dbp.state import StateMismatch
from experiments.sweeps import purification_sweep as sweep

ROOT = Path(__file__).resolve().parents[1]


def args(ckpts, out, *extra):
    cls, diff = ckpts
    return ["--purifier", str(diff), "--classifier", str(cls), "--repository", str(ROOT / "model_repository"),
            "--n_images", "4", "--n_eot", "2", "--k", "2", "--steps", "2", "--eot", "2", "--batch", "4",
            "--latency_reps", "1", "--latency_batch", "4", "--points", "t100-n40,t050-n100", "--out", str(out), *extra]


def test_steps_for_calls(tiny_diffusion_ckpt):
    """DDIM N for about {5, 10, 20, 50} UNet calls from t* = 100: exact strides, the served N = 100 for 10."""
    net = load_unet(tiny_diffusion_ckpt)
    got = {c: sweep.steps_for_calls(net, 100, "ddim", c) for c in sweep.CALL_TARGETS}
    assert got == {5: (40, 5), 10: (100, 11), 20: (200, 21), 50: (500, 51)}
    names = [p["name"] for p in sweep.plan_points(net, {"t_star": 100, "sampler": "ddim", "num_inference_steps": 100})]
    assert len(names) == 8 and names.count("t100-n100") == 1  # the served point once, in both sweeps


def test_sweep_resumes_refuses_and_plots(tiny_classifier_ckpt, tiny_diffusion_ckpt, tmp_path, monkeypatch):
    ckpts, out, copy = (tiny_classifier_ckpt, tiny_diffusion_ckpt), tmp_path / "sweep", tmp_path / "docs"
    res = sweep.main(args(ckpts, out, "--copy", "--copy_to", str(copy)))
    done = out / "points" / "t100-n40.json"
    state = json.loads(done.read_text())
    assert set(state["results"]) == set(sweep.COMPONENTS)
    assert state["point"]["sweeps"] == ["B"] and not state["point"]["served"] and state["point"]["unet_calls"] == 5
    assert json.loads((out / "points" / "t050-n100.json").read_text())["point"]["sweeps"] == ["A"]
    r = state["results"]
    assert r["clean"]["n"] == 4 and r["eot_linf_8_255"]["n"] == 2 and 0 <= r["dwbox_linf_0.1"]["acc"] <= 1
    assert -1 <= r["gradient_cosine"]["draws_1"]["mean"] <= 1 and r["latency"]["batch_4"]["ms_per_image"] > 0
    assert r["latency"]["batch_4"]["cpu_ms_per_image"] > 0
    for name in ("purification_sweep.json", "purification_sweep.md", "sweep_tstar.png", "sweep_steps.png"):
        assert (out / name).stat().st_size > 0 and (copy / name).exists(), name
    assert (out / "sweep_tstar.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((out / "purification_sweep.json").read_text())
    assert sum(p["results"] is not None for p in doc["points"]) == 2 and len(doc["points"]) == 8
    assert "t050-n100" in (out / "purification_sweep.md").read_text()
    assert len(res["points"]) == 8

    # a rerun recomputes nothing; a half-finished point resumes at its missing measurement only
    calls = []
    monkeypatch.setattr(sweep, "measure", lambda name, *a, **k: calls.append(name) or state["results"][name])
    sweep.main(args(ckpts, out))
    assert calls == []
    half = dict(state, results={k: v for k, v in state["results"].items() if k != "latency"})
    (out / "points" / "t100-n40.partial.json").write_text(json.dumps(half))
    done.unlink()
    sweep.main(args(ckpts, out))
    assert calls == ["latency"] and done.exists() and not (out / "points" / "t100-n40.partial.json").exists()

    # the outputs alone, from what is saved
    (copy / "sweep_steps.png").unlink()
    sweep.main(args(ckpts, out, "--report_only", "--copy", "--copy_to", str(copy)))
    assert calls == ["latency"] and (copy / "sweep_steps.png").exists()

    # another configuration is refused, naming what differs
    with pytest.raises(StateMismatch, match="steps"):
        sweep.main(args(ckpts, out, "--steps", "3"))


def _result(per_image, eot):
    return {c: {"per_image": list(per_image)} for c in sweep.PAIRED_OUTCOMES} | {"eot_linf_8_255": {"per_image": eot}}


def test_paired_vs_served_counts_and_exact_p():
    """Point vs the served point, image by image: 5 images right only at the point and none only at the served one
    give McNemar p = 2 / 2^5; EoT hits out of k = 10 (+2 on each of 3 images) give the exact sign-flip p = 2 / 2^3.
    A point without results, and the served point itself, are left out."""
    pts = [{"name": "t100-n100", "served": True, "unet_calls": 11}, {"name": "t100-n40", "served": False,
                                                                     "unet_calls": 5},
           {"name": "t150-n100", "served": False, "unet_calls": 16}]
    served = _result([1.0] * 5 + [0.0] * 5 + [1.0] * 2, [0.5, 0.5, 0.5, 0.3])
    point = _result([1.0] * 5 + [1.0] * 5 + [1.0] * 2, [0.7, 0.7, 0.7, 0.3])
    done = {"t100-n100": {"results": served}, "t100-n40": {"results": point}}
    pairs = sweep.paired_vs_served({"k": 10}, pts, done)
    assert set(pairs) == {"t100-n40"}
    q = pairs["t100-n40"]
    assert (q["clean"]["only_point_right"], q["clean"]["only_served_right"], q["clean"]["n"]) == (5, 0, 12)
    assert q["dwbox_linf_8_255"]["p_value"] == pytest.approx(2 / 32) and q["clean"]["diff"] == pytest.approx(5 / 12)
    assert q["eot_linf_8_255"]["diff"] == pytest.approx(0.15) and q["eot_linf_8_255"]["p_value"] == pytest.approx(0.25)
    md = "\n".join(sweep.paired_markdown({"k": 10}, pts, pairs))
    assert "| t100-n40 | 5 | +41.7 (5 / 0, p=0.062) |" in md and "t150-n100" not in md
    assert sweep.paired_vs_served({"k": 10}, pts, {"t100-n40": {"results": point}}) == {}  # nothing to pair with
