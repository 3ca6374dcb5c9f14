"""The training CLIs end to end: smoke runs, exact resume, SIGKILL recovery, torchrun/DDP, CLI errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dbp import checkpoint as ckpt
from dbp import trainer as trainer_mod
from dbp.models import load_classifier, load_unet
from training import train_classifier, train_diffusion

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
SCRIPTS = {"diffusion": "training.train_diffusion", "classifier": "training.train_classifier"}  # python -m
MAINS = {"diffusion": train_diffusion.main, "classifier": train_classifier.main}
# small but real: the diffusion grid runs DDPM (101 UNet calls) on grid_n images
FAST = {"diffusion": ["--grid_n", "2"], "classifier": ["--eval_n", "64"]}
SMALL = ["--batch_size", "8"]  # per-step cost for the multi-run tests


def env(threads: int = 1) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}


def run_cli(kind: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", SCRIPTS[kind], *args], capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd=ROOT)


def weights(ckpt_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.stem: load_file(f) for f in sorted(Path(ckpt_dir).glob("*.safetensors"))}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and "model" in wa
    for kind in wa:
        assert wa[kind].keys() == wb[kind].keys()
        for k in wa[kind]:
            assert torch.equal(wa[kind][k], wb[kind][k]), (kind, k)


# ---- smoke runs of both CLIs ------------------------------------------------------------------------

def test_diffusion_smoke_cli(tmp_path):
    out = tmp_path / "diff"
    r = run_cli("diffusion", "--preset", "smoke", "--out_dir", str(out), "--threads", "1", *FAST["diffusion"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 12
    meta = ckpt.load_meta(out / "checkpoint")
    assert meta["kind"] == "diffusion" and meta["step"] == 12 and meta["world_size"] == 1
    assert meta["config"]["t_max"] == 100 and meta["config"]["steps"] == 12  # the preset, saved with the weights
    assert {"model", "ema", "optimizer"} <= set(weights(out / "checkpoint"))
    grid = Image.open(out / "purification_grid.png")
    assert grid.size[0] > 32 and grid.size[1] >= 4 * 32  # 4 rows: clean, noised, DDIM, DDPM
    Image.open(out / "loss.png").verify()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 12 and report["final_loss"] > 0
    eps = load_unet(out / "checkpoint")
    with torch.no_grad():
        assert eps(torch.zeros(1, 1, 32, 32), torch.tensor([50])).shape == (1, 1, 32, 32)


def test_classifier_smoke_cli(tmp_path):
    out = tmp_path / "cls"
    r = run_cli("classifier", "--preset", "smoke", "--out_dir", str(out), "--threads", "1", *FAST["classifier"])
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_test"] == 64 and 0 <= result["test_accuracy"] <= 1
    meta = ckpt.load_meta(out / "checkpoint")
    assert meta["kind"] == "classifier" and meta["step"] == 20 and meta["arch"]["classifier"] == "small_cnn"
    assert {"model", "optimizer"} <= set(weights(out / "checkpoint"))
    model = load_classifier(out / "checkpoint")
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert json.loads((out / "report.json").read_text())["config"]["eval_n"] == 64


# ---- exact resume -----------------------------------------------------------------------------------

class Stop(Exception):
    pass


@pytest.mark.parametrize("kind", ["diffusion", "classifier"])
def test_resume_reaches_the_same_weights(tmp_path, monkeypatch, kind):
    """Stop right after the checkpoint at step 10, restart: the final weights equal an uninterrupted run's."""
    args = ["--preset", "smoke", "--steps", "14", "--ckpt_every", "5", "--threads", "1", *SMALL, *FAST[kind]]
    MAINS[kind]([*args, "--out_dir", str(tmp_path / "straight")])

    save = trainer_mod.Trainer.save

    def save_then_stop(self, step):
        save(self, step)
        if step == 10:
            raise Stop

    monkeypatch.setattr(trainer_mod.Trainer, "save", save_then_stop)
    with pytest.raises(Stop):
        MAINS[kind]([*args, "--out_dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(trainer_mod.Trainer, "save", save)
    assert ckpt.load_meta(tmp_path / "resumed" / "checkpoint")["step"] == 10
    MAINS[kind]([*args, "--out_dir", str(tmp_path / "resumed")])
    assert ckpt.load_meta(tmp_path / "resumed" / "checkpoint")["step"] == 14
    assert_same_weights(tmp_path / "straight" / "checkpoint", tmp_path / "resumed" / "checkpoint")
    hist = [h["step"] for h in ckpt.load_meta(tmp_path / "resumed" / "checkpoint")["history"]]
    assert hist == sorted(set(hist))  # the log is not replayed twice


def test_diffusion_init_and_t_range(tmp_path, tiny_diffusion_ckpt):
    """--init starts from the checkpoint's EMA weights (0 steps: the saved model IS them; mutation: dropping
    load_init makes the weights differ), --t_min/--t_max bound the training timesteps, and both are recorded."""
    out = tmp_path / "ft"
    train_diffusion.main(["--preset", "smoke", "--steps", "0", "--grid_n", "1", "--init", str(tiny_diffusion_ckpt),
                          "--t_min", "120", "--t_max", "300", "--out_dir", str(out), "--threads", "1"])
    init_ema, got = load_file(tiny_diffusion_ckpt / "ema.safetensors"), weights(out / "checkpoint")["model"]
    assert init_ema.keys() == got.keys() and all(torch.equal(init_ema[k], got[k]) for k in got)
    meta = ckpt.load_meta(out / "checkpoint")
    assert (meta["config"]["t_min"], meta["config"]["t_max"]) == (120, 300)
    assert meta["init"]["ema_sha256"] == ckpt.weights_sha256(tiny_diffusion_ckpt, "ema")
    cfg = train_diffusion.DiffusionConfig(t_min=120, t_max=300)
    t = train_diffusion.sample_timesteps(cfg, 20000, "cpu")
    assert int(t.min()) == 120 and int(t.max()) == 300  # both ends reached, nothing outside


def test_resume_refuses_a_different_run(tmp_path):
    out = tmp_path / "run"
    train_classifier.main(["--preset", "smoke", "--steps", "2", "--out_dir", str(out), "--threads", "1",
                           *FAST["classifier"]])
    with pytest.raises(ckpt.CheckpointError, match="different run"):
        train_diffusion.main(["--preset", "smoke", "--steps", "2", "--out_dir", str(out), "--threads", "1"])


# ---- SIGKILL ----------------------------------------------------------------------------------------

def test_sigkill_resumes_from_last_checkpoint(tmp_path):
    out, every, total = tmp_path / "killed", 3, 30
    args = ["--preset", "smoke", "--steps", str(total), "--ckpt_every", str(every), "--out_dir", str(out),
            "--threads", "1", "--grid_n", "1", *SMALL]
    proc = subprocess.Popen([PY, "-m", SCRIPTS["diffusion"], *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    seen, deadline = [], time.time() + 120
    try:
        while time.time() < deadline:
            try:
                step = ckpt.load_meta(out / "checkpoint")["step"]
            except ckpt.CheckpointError:  # not written yet (or mid-rename: load_meta must never see half)
                step = 0
            if step and (not seen or seen[-1] != step):
                seen.append(step)
            if step >= 2 * every:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before the kill: make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and seen and seen[-1] >= 2 * every
    saved = ckpt.load_meta(out / "checkpoint")["step"]
    # checkpoints every interval, never going back: a kill loses less than one interval
    assert all(s % every == 0 for s in seen + [saved]) and saved >= seen[-1] and saved < total
    ckpt.load_weights(out / "checkpoint", "model")  # readable after a kill at any moment

    r = run_cli("diffusion", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint'} at step {saved}" in r.stderr
    assert ckpt.load_meta(out / "checkpoint")["step"] == total
    assert (out / "purification_grid.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "loss.png", "purification_grid.png",
                                                      "report.json"]


# ---- torchrun / DDP (gloo, 2 CPU processes) ---------------------------------------------------------------

def test_torchrun_two_processes(tmp_path):
    """train_diffusion unchanged under torchrun (gloo, 2 CPU ranks); the classifier CLI shares the same Trainer."""
    kind = "diffusion"
    out = tmp_path / kind
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", SCRIPTS[kind], "--preset", "smoke",
           "--out_dir", str(out), "--threads", "1", *FAST[kind]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    meta = ckpt.load_meta(out / "checkpoint")
    assert meta["world_size"] == 2 and meta["step"] == meta["config"]["steps"]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("{")]) == 1  # only rank 0 reports
    assert (out / "report.json").exists()


# ---- bad command lines ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,argv,words", [
    ("diffusion", ["--bogus", "1"], ["bogus"]),
    ("diffusion", ["--steps", "many"], ["--steps", "int"]),
    ("diffusion", ["--preset", "huge"], ["huge", "smoke"]),
    ("diffusion", ["--t_max", "5000"], ["--t_max"]),
    ("diffusion", ["--t_min", "300", "--t_max", "200"], ["--t_min"]),
    ("diffusion", ["--init", "/nonexistent/ckpt"], ["--init"]),
    ("diffusion", ["--flip", "sometimes"], ["--flip"]),
    ("classifier", ["--lr", "fast"], ["--lr", "float"]),
    ("classifier", ["--preset", "nope"], ["nope"]),
    ("classifier", ["stray"], ["stray"]),
])
def test_bad_cli_input(capsys, kind, argv, words):
    with pytest.raises(SystemExit) as e:
        MAINS[kind](argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)


def test_bad_cli_input_as_a_process():
    """The in-process cases above cover both CLIs; this one checks what a shell sees: exit 2, a message, no traceback."""
    r = run_cli("diffusion", "--bogus_option", "3", "--preset", "smoke")
    assert r.returncode == 2
    assert "bogus_option" in r.stderr and "Traceback" not in r.stderr
