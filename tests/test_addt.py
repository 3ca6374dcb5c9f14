"""ADDT: RBGM, lambda_t, CGPO, the loss target, no gradient leakage, and the run_addt CLI (incl. DDP)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dbp.addt import ADDTConfig, addt_loss, cgpo, lambda_t, mix_noise, normalize_rows, rbgm
from dbp.diffusion import Diffusion, to_model_range
from dbp import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# ---- RBGM --------------------------------------------------------------------------------------
def test_rbgm_paper_example():
    delta = torch.tensor([[0.5, -2.2, -1.4, 7.2, 5.1, -0.6, 1.1]])
    z = torch.tensor([[1.2, 0, -1.6, 0.8, -0.6, 0.4, -0.2]])
    assert torch.equal(rbgm(delta, z=z), torch.tensor([[0, -1.6, -0.6, 1.2, 0.8, -0.2, 0.4]]))


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 1, 32, 32), (5, 2, 7), (3, 10)])
def test_rbgm_ranks_and_values(shape):
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(shape, generator=g) * 17 + 3
    out = rbgm(delta, generator=torch.Generator().manual_seed(2))
    rows_in = delta.reshape(-1, delta.shape[-1]) if delta.dim() == 2 else delta.reshape(shape[0] * shape[1], -1)
    rows_out = out.reshape(rows_in.shape)
    # same ordering in every (sample, channel) row
    assert torch.equal(rows_in.argsort(1), rows_out.argsort(1))
    # exactly the drawn Gaussian values: replay the generator's draw
    z = torch.randn(rows_in.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(rows_out.sort(1).values, z.sort(1).values)
    assert out.shape == delta.shape


def test_rbgm_is_scale_free_and_rows_are_independent():
    delta = torch.randn(2, 3, 4, 4)
    z = torch.randn(6, 16)
    assert torch.equal(rbgm(delta, z=z), rbgm(delta * 1e-3 + 0.0, z=z))
    # changing one row's input leaves the other rows' outputs alone
    d2 = delta.clone()
    d2[1, 2] = -d2[1, 2]
    a, b = rbgm(delta, z=z), rbgm(d2, z=z)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1, 2], b[1, 2])


def test_normalize_rows_control():
    out = normalize_rows(torch.randn(3, 2, 8, 8) * 5)
    norms = out.reshape(6, -1).norm(dim=1)
    assert torch.allclose(norms, torch.full((6,), 8.0), atol=1e-4)


# ---- lambda schedule ---------------------------------------------------------------------------
def test_lambda_t_matches_method_table():
    d = Diffusion()
    lam = lambda t: float(lambda_t(d.abar(t)))  # noqa: E731
    assert round(lam(50), 3) == 0.170
    assert round(lam(100), 3) == 0.088
    # method.md lists 0.042 and 0.009 with loose rounding (0.0415 and 0.0087)
    assert lam(200) == pytest.approx(0.042, abs=1e-3)
    assert lam(500) == pytest.approx(0.009, abs=1e-3)
    assert all(lam(t) == pytest.approx(0.3) for t in range(0, 27))
    assert lam(27) < 0.3


def test_mix_noise_is_variance_preserving_for_independent_noise():
    g = torch.Generator().manual_seed(0)
    eps, ed = torch.randn(4000, 1, 8, 8, generator=g), torch.randn(4000, 1, 8, 8, generator=g)
    mixed = mix_noise(eps, ed, torch.full((4000,), 0.3))
    assert mixed.std().item() == pytest.approx(1.0, abs=0.01)


# ---- CGPO and the loss -------------------------------------------------------------------------
def _eps_fn(eps_net):
    return lambda x, t: eps_net(x, t)


def test_cgpo_raises_classifier_ce_over_random_perturbation(tiny_models, fashion_test):
    eps_net, clf = tiny_models
    d = Diffusion()
    x0 = to_model_range(fashion_test.float01(slice(0, 64)))
    y = fashion_test.labels[:64]
    t = torch.full((64,), 10)
    lam = lambda_t(d.abar(t))
    g = torch.Generator().manual_seed(0)
    eps_delta, _ = cgpo(_eps_fn(eps_net), clf, d, x0, y, t, lam, ADDTConfig(), g)

    def mean_ce(ed, draws=4):
        gg = torch.Generator().manual_seed(123)  # same diffusion noise for both candidates
        ces = []
        with torch.no_grad():
            for _ in range(draws):
                x_t = d.q_sample(x0, t, mix_noise(torch.randn(x0.shape, generator=gg), ed, lam))
                x0_hat = d.predict_x0(x_t, t, eps_net(x_t, t))
                ces.append(F.cross_entropy(clf(x0_hat / 2 + 0.5), y).item())
        return sum(ces) / len(ces)

    ce_cgpo, ce_random = mean_ce(eps_delta), mean_ce(torch.randn(x0.shape, generator=g))
    assert ce_cgpo > ce_random * 1.05, (ce_cgpo, ce_random)
    # eps_delta is an exact Gaussian sample per row (RBGM output)
    assert eps_delta.reshape(64, -1).std(1).mean().item() == pytest.approx(1.0, abs=0.05)


def test_cgpo_leaves_every_parameter_untouched(tiny_models, fashion_test):
    eps_net, clf = tiny_models
    params = list(eps_net.parameters()) + list(clf.parameters())
    for p in params:
        p.requires_grad_(True)  # even trainable parameters must get no gradient from CGPO
        p.grad = None
    before = [p.detach().clone() for p in params]
    d = Diffusion()
    x0 = to_model_range(fashion_test.float01(slice(0, 8)))
    t = torch.randint(0, 100, (8,))
    cgpo(_eps_fn(eps_net), clf, d, x0, fashion_test.labels[:8], t, lambda_t(d.abar(t)), ADDTConfig())
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_loss_target_is_mixed_noise(tiny_models, fashion_test):
    eps_net, clf = tiny_models
    eps_net.eval()
    d = Diffusion()
    x0 = to_model_range(fashion_test.float01(slice(0, 6)))
    y, t = fashion_test.labels[:6], torch.tensor([0, 5, 26, 50, 100, 300])
    seen = {}

    def zero_model(x_t, tt):
        seen["x_t"] = x_t.detach()
        return torch.zeros_like(x_t)

    cfg = ADDTConfig()
    loss, logs = addt_loss(zero_model, _eps_fn(eps_net), clf, d, x0, y, t, cfg, torch.Generator().manual_seed(5))
    # replay the same random stream: eps first, then CGPO
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(x0.shape, generator=g)
    lam = lambda_t(d.abar(t))
    eps_delta, _ = cgpo(_eps_fn(eps_net), clf, d, x0, y, t, lam, cfg, g)
    target = mix_noise(eps, eps_delta, lam)
    assert torch.allclose(seen["x_t"], d.q_sample(x0, t, target), atol=1e-6)
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
    assert not torch.allclose(target, eps)  # the adversarial part is really in the target
    assert "ce" in logs


def test_clean_mode_target_is_plain_noise(fashion_test):
    d = Diffusion()
    x0 = to_model_range(fashion_test.float01(slice(0, 4)))
    t = torch.tensor([1, 10, 100, 900])
    captured = {}

    def zero_model(x_t, tt):
        captured["x_t"] = x_t
        return torch.zeros_like(x_t)

    loss, _ = addt_loss(zero_model, None, None, d, x0, fashion_test.labels[:4], t, ADDTConfig(),
                        torch.Generator().manual_seed(3))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(captured["x_t"], d.q_sample(x0, t, eps))
    assert loss.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-6)


# ---- the CLI ------------------------------------------------------------------------------------
def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kw)


def test_run_addt_smoke_resume_and_controls(tmp_path, tiny_classifier_ckpt, tiny_diffusion_ckpt):
    common = [PY, "-m", "training.run_addt", "--preset", "smoke", "--init", str(tiny_diffusion_ckpt),
              "--classifier", str(tiny_classifier_ckpt), "--threads", "1"]
    out = tmp_path / "addt"
    r = _run(common + ["--out_dir", str(out), "--steps", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert ckpt.load_meta(out / "checkpoint")["step"] == 2
    r = _run(common + ["--out_dir", str(out), "--steps", "4"])  # resumes at step 2
    assert r.returncode == 0, r.stderr[-2000:]
    meta = ckpt.load_meta(out / "checkpoint")
    assert meta["step"] == 4 and meta["kind"] == "addt" and meta["mode"] == "addt"
    assert [h["step"] for h in meta["history"]] == [1, 2, 3, 4]
    assert all("ce" in h for h in meta["history"])
    assert (out / "loss.png").stat().st_size > 0
    # fine-tuned weights differ from the init and load as a purifier
    from dbp.models import load_unet
    a, b = load_unet(out / "checkpoint", "model"), load_unet(tiny_diffusion_ckpt)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    for extra, mode, rb in ((["--mode", "clean"], "clean", True), (["--no-rbgm"], "addt", False)):
        o = tmp_path / mode / str(rb)
        r = _run(common + ["--out_dir", str(o), "--steps", "1"] + extra)
        assert r.returncode == 0, r.stderr[-2000:]
        rep = json.loads((o / "report.json").read_text())
        assert rep["mode"] == mode and rep["rbgm"] is rb


@pytest.mark.parametrize("args,needle", [
    (["--mode", "pgd"], "--mode"),
    (["--t_max", "2000"], "t_max"),
    (["--init", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--mode", "clean", "--no-rbgm"], "no_rbgm"),
    (["--lr", "fast"], "--lr"),
])
def test_run_addt_bad_input_is_a_clear_cli_error(args, needle, tiny_classifier_ckpt, tiny_diffusion_ckpt, tmp_path):
    r = _run([PY, "-m", "training.run_addt", "--preset", "smoke", "--init", str(tiny_diffusion_ckpt),
              "--classifier", str(tiny_classifier_ckpt), "--out_dir", str(tmp_path)] + args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_run_addt_ddp_two_ranks_stay_in_sync(tmp_path, tiny_classifier_ckpt, tiny_diffusion_ckpt):
    torchrun = str(Path(PY).parent / "torchrun")
    out = tmp_path / "ddp"
    r = _run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training.run_addt", "--preset", "smoke",
              "--init", str(tiny_diffusion_ckpt), "--classifier", str(tiny_classifier_ckpt),
              "--out_dir", str(out), "--steps", "3", "--threads", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["world_size"] == 2
    assert len(rep["rank_weight_sha256"]) == 2 and rep["ranks_in_sync"]
    # and the weights really moved (a no-op run would also be "in sync")
    from dbp.models import load_unet
    a, b = load_unet(out / "checkpoint", "model"), load_unet(tiny_diffusion_ckpt)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_run_addt_from_a_fresh_clone_fine_tunes_the_deployed_models(tmp_path):
    """No --init/--classifier and no runs/: the newest versions in model_repository/ are the defaults."""
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "model_repository"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for f in tracked:  # what `git clone` gives: the committed repository, no training outputs
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        (clone / f).write_bytes((ROOT / f).read_bytes())
    newest = max(int(p.name) for p in (clone / "model_repository" / "purifier").iterdir() if p.name.isdigit())
    out = tmp_path / "addt"
    r = subprocess.run([PY, "-m", "training.run_addt", "--preset", "smoke", "--threads", "1", "--out_dir", str(out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=clone,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (clone / "runs").exists()
    for role in ("purifier", "classifier"):
        assert f"using the deployed {role} model_repository/{role}/{newest}/weights" in r.stderr
    meta = ckpt.load_meta(out / "checkpoint")
    assert meta["kind"] == "addt" and meta["step"] == 4
    assert meta["init"] == f"model_repository/purifier/{newest}/weights"
    from dbp.models import load_unet
    a, b = load_unet(out / "checkpoint", "model"), load_unet(clone / meta["init"])
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
