"""training.learning_curve on the tiny session models: two fake snapshot arms, few images, a short chain."""
import json

import pytest
import torch

from dbp import checkpoint as ckpt
from dbp.config import ConfigError
from dbp.paired import OutcomeRecord
from training import learning_curve

FAST = ["--n_images", "3", "--batch_size", "2", "--steps", "2", "--num_inference_steps", "50", "--threads", "1"]


def snapshot(src, dst, step: int, scale: float, seed: int):
    """A weights-only snapshot as the trainer writes it: the tiny model, perturbed so each one differs."""
    meta = dict(ckpt.load_meta(src), step=step, kind="addt")
    g = torch.Generator().manual_seed(seed)
    w = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
         for k, v in ckpt.load_weights(src).items()}
    ckpt.save_checkpoint(dst / "snapshots" / f"step_{step:06d}", meta, w, w)


@pytest.fixture
def runs(tmp_path, tiny_diffusion_ckpt):
    for arm, seed in (("addt", 1), ("clean", 2)):
        snapshot(tiny_diffusion_ckpt, tmp_path / arm, 10, 1e-3, seed)
    return tmp_path


def args(runs, tiny_diffusion_ckpt, tiny_classifier_ckpt, *extra):
    return ["--base", str(tiny_diffusion_ckpt), "--classifier", str(tiny_classifier_ckpt),
            "--arms", f"{runs / 'addt'},{runs / 'clean'}", "--out_dir", str(runs / "curve"),
            "--figure", str(runs / "curve" / "curve.png"), *FAST, *extra]


def test_curve_evaluates_every_model_once_and_resumes(runs, tiny_diffusion_ckpt, tiny_classifier_ckpt, capsys):
    a = args(runs, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert learning_curve.main(a) == 0
    cache = json.loads((runs / "curve" / "results.json").read_text())
    assert set(cache["models"]) == {"base", "addt/step_000010", "clean/step_000010"}
    assert cache["config"]["n_images"] == 3 and cache["eval"]["keep"] == "best"
    recs = {k: {w: OutcomeRecord.from_dict(e["records"][w]) for w in ("clean", "robust")}
            for k, e in cache["models"].items()}
    idx = recs["base"]["robust"].indices
    assert len(idx) == 3 and min(idx) >= 1024  # held out from the gate's first 1024 images
    for k, r in recs.items():  # one subset and one noise draw for every model, bound into each record
        assert r["robust"].indices == idx and r["clean"].seeds == recs["base"]["clean"].seeds
        # best iterate: the clean point is a candidate, so no image is robust that was not clean
        assert all(c or not rb for c, rb in zip(r["clean"].outcomes, r["robust"].outcomes)), k
    table = json.loads((runs / "curve" / "curve.json").read_text())
    assert [r["key"] for r in table["rows"]] == ["base", "addt/step_000010", "clean/step_000010"]
    assert {(c["candidate"], c["baseline"]) for c in table["comparisons"]} >= {
        ("addt/step_000010", "base"), ("addt/step_000010", "clean/step_000010")}
    md = (runs / "curve" / "curve.md").read_text()
    assert "| base | base | 0 |" in md and "McNemar" in md
    assert (runs / "curve" / "curve.png").stat().st_size > 10_000
    assert all(not r["path"].startswith("/work/main") for r in table["rows"])  # repo-relative when inside it

    # a new snapshot appears: only it is evaluated, the cached results stay as they were
    snapshot(tiny_diffusion_ckpt, runs / "addt", 20, 2e-3, 3)
    capsys.readouterr()
    assert learning_curve.main(a) == 0
    assert "3 cached, 1 to evaluate" in capsys.readouterr().err
    again = json.loads((runs / "curve" / "results.json").read_text())
    assert set(again["models"]) == set(cache["models"]) | {"addt/step_000020"}
    for k in cache["models"]:
        assert again["models"][k] == cache["models"][k]
    # --max_models stops early (exit 3) and a rerun finishes the rest
    snapshot(tiny_diffusion_ckpt, runs / "clean", 20, 2e-3, 4)
    snapshot(tiny_diffusion_ckpt, runs / "clean", 30, 3e-3, 5)
    assert learning_curve.main(a + ["--max_models", "1"]) == learning_curve.EXIT_INCOMPLETE
    capsys.readouterr()
    # --max_models took clean/step_000020; --every 20 leaves step 30 for a run without it
    assert learning_curve.main(a + ["--every", "20"]) == 0
    assert "5 cached, 0 to evaluate" in capsys.readouterr().err
    assert len(json.loads((runs / "curve" / "results.json").read_text())["models"]) == 5
    assert learning_curve.main(a) == 0
    assert "5 cached, 1 to evaluate" in capsys.readouterr().err
    assert len(json.loads((runs / "curve" / "results.json").read_text())["models"]) == 6


def test_bad_input_is_refused(runs, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    a = args(runs, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    with pytest.raises(ConfigError, match="snapshots does not exist"):
        learning_curve.main(a + ["--arms", str(runs / "nowhere")])
    with pytest.raises(ConfigError, match="not a dbp checkpoint"):
        learning_curve.main(a + ["--base", str(runs)])
    with pytest.raises(ConfigError, match="n_images 9000 exceeds"):
        learning_curve.main(a + ["--n_images", "9000"])
    with pytest.raises(ConfigError, match="keep must be best or last"):
        learning_curve.main(a + ["--keep", "worst"])
    with pytest.raises(ConfigError, match="grad_checkpoint"):
        learning_curve.main(a + ["--grad_checkpoint", "sometimes"])
    # results of another evaluation in the same out_dir are not mixed in
    (runs / "curve").mkdir()
    (runs / "curve" / "results.json").write_text(json.dumps({"eval": {"steps": 7}, "models": {}}))
    with pytest.raises(ConfigError, match="different evaluation"):
        learning_curve.main(a)
