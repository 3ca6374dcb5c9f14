"""dbp.nets (UNet layouts, diffusers folders, classifiers) and dbp.checkpoint (exact, atomic, never pickle)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch import nn

from dbp import checkpoint as ckpt
from dbp.models import load_classifier, load_unet
from dbp.nets import (DATA_STATS, Classifier, EpsNet, build_classifier, build_unet, load_diffusers_unet,
                      set_dropout)

# google/ddpm-cifar10-32's unet/config.json (the paper's CIFAR-10 DDPM), as published with diffusers 0.0.4,
# plus attention_head_dim=None: single-head attention as in the original model
GOOGLE_DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- UNets -----------------------------------------------------------------------------------------

def test_ddpm_cifar10_layout_is_googles():
    ours = build_unet("ddpm-cifar10")
    assert n_params(ours) == 35_746_307
    ref = UNet2DModel.from_config(GOOGLE_DDPM_CIFAR10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict())
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([100])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t).sample, ref(x, t).sample, atol=1e-5, rtol=0)


def test_small_unet_and_epsnet():
    unet = build_unet("small").eval()
    assert 0.5e6 < n_params(unet) < 3e6
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 100])
    with torch.no_grad():
        out = EpsNet(unet)(x, t)
        assert out.shape == x.shape and torch.equal(out, unet(x, t).sample)
        # the timestep really conditions the output
        assert not torch.allclose(out, EpsNet(unet)(x, torch.tensor([500, 900])))
    assert build_unet("small", dropout=0.1).config.dropout == 0.1
    with pytest.raises(ValueError, match="unknown UNet config"):
        build_unet("huge")


def test_set_dropout_reaches_every_dropout():
    unet = build_unet("small")
    set_dropout(unet, 0.1)
    drops = [m for m in unet.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.1 for m in drops)


@pytest.mark.parametrize("layout", ["plain", "pipeline"])
def test_load_diffusers_unet_offline(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: a hub lookup would fail loudly
    torch.manual_seed(0)
    unet = build_unet("small").eval()
    folder = tmp_path / layout
    if layout == "plain":
        unet.save_pretrained(folder)
    else:
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
        assert (folder / "unet" / "config.json").exists() and (folder / "model_index.json").exists()
    loaded = load_diffusers_unet(folder).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 100])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, unet(x, t).sample)
    assert tuple(loaded.config.block_out_channels) == tuple(unet.config.block_out_channels)


def test_load_diffusers_unet_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_diffusers_unet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_unet(tmp_path / "empty")


# ---- classifiers -----------------------------------------------------------------------------------

def test_wrn_28_10():
    torch.manual_seed(0)
    model = build_classifier("wrn-28-10", "cifar10").eval()
    assert n_params(model) == 36_489_290  # WRN-28-10 (meliketoy format, biased convs), 10 classes
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 25 and max(m.out_channels for m in convs) == 640  # 1 + 12 blocks x 2, widths 16..640
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    c100 = build_classifier("wrn-28-10", "cifar100", 100)
    assert c100.net.linear.out_features == 100
    assert torch.allclose(c100.normalize.mean.flatten(), torch.tensor(DATA_STATS["cifar100"][0]))


def test_classifier_normalises_inside():
    torch.manual_seed(0)
    model = build_classifier("small_cnn", "fashion_mnist").eval()
    x = torch.rand(4, 1, 32, 32)
    mean, std = DATA_STATS["fashion_mnist"]
    with torch.no_grad():
        assert torch.equal(model(x), model.net((x - mean[0]) / std[0]))
        assert model(x).shape == (4, 10)
    c10 = build_classifier("small_cnn", "cifar10")
    assert c10.normalize.mean.shape == (1, 3, 1, 1) and isinstance(c10, Classifier)
    with torch.no_grad():
        assert c10.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown classifier arch"):
        build_classifier("vit", "cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_classifier("small_cnn", "svhn")


# ---- checkpoints -----------------------------------------------------------------------------------

def train_a_bit(model, opt, ema, steps, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    for _ in range(steps):
        x, y = torch.rand(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(model.parameters())


def make_state(seed=0):
    torch.manual_seed(seed)
    model = build_classifier("small_cnn", "fashion_mnist")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, betas=(0.8, 0.95))
    ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.75)
    return model, opt, ema


def ema_sd(model, ema):
    names = [n for n, _ in model.named_parameters()]
    return dict(zip(names, [p.clone() for p in ema.shadow_params]))


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, opt, ema = make_state()
    train_a_bit(model, opt, ema, 3, seed=1)
    meta = {"kind": "classifier", "arch": {"classifier": "small_cnn", "dataset": "fashion_mnist"}, "step": 3,
            "config": {"lr": 1e-3}}
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoint", meta, model.state_dict(), ema_sd(model, ema),
                                opt.state_dict())
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "meta.json", "model.safetensors",
                                                      "optimizer.safetensors"]
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint"]  # no temp or .old leftovers
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in [path, *path.iterdir()])  # readable by a server's user
    loaded_meta = ckpt.load_meta(path)
    assert {k: loaded_meta[k] for k in meta} == meta

    model2, opt2, ema2 = make_state(seed=99)
    sd = ckpt.load_weights(path, "model")
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():  # bit-exact, dtype included (BatchNorm's int64 counter)
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    model2.load_state_dict(sd)
    ema_loaded = ckpt.load_weights(path, "ema")
    for k, v in ema_sd(model, ema).items():
        assert torch.equal(ema_loaded[k], v)
    opt2.load_state_dict(ckpt.load_optimizer(path))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert json.loads(json.dumps(s1["param_groups"])) == json.loads(json.dumps(s2["param_groups"]))
    assert s1["state"].keys() == s2["state"].keys()
    for pid in s1["state"]:
        for name, v in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(s2["state"][pid][name]), torch.as_tensor(v)), (pid, name)
    assert float(s2["state"][0]["step"]) == 3.0  # AdamW's bias correction counter survives

    # the proof that matters: training continues identically from the restored state
    train_a_bit(model, opt, ema, 2, seed=5)
    train_a_bit(model2, opt2, ema2, 2, seed=5)  # ema2 restarts; compare the trained weights only
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_is_never_pickle(tmp_path):
    from safetensors import safe_open
    model, opt, ema = make_state()
    train_a_bit(model, opt, ema, 1, seed=0)
    path = ckpt.save_checkpoint(tmp_path / "c", {"kind": "classifier"}, model.state_dict(), ema_sd(model, ema),
                                opt.state_dict())
    assert len(list(path.iterdir())) == 4
    for f in path.iterdir():
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as st:  # parses as safetensors: a header length, JSON header, raw tensors
                assert len(list(st.keys())) > 0
        else:
            assert f.name == "meta.json" and isinstance(json.loads(f.read_text()), dict)


def test_ema_falls_back_to_model_and_hash_binds_weights(tmp_path):
    model, _, _ = make_state()
    path = ckpt.save_checkpoint(tmp_path / "c", {"kind": "classifier"}, model.state_dict())
    assert ckpt.load_optimizer(path) is None
    assert all(torch.equal(a, b) for a, b in zip(ckpt.load_weights(path, "ema").values(),
                                                 ckpt.load_weights(path, "model").values()))
    h = ckpt.weights_sha256(path)
    assert h == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    with torch.no_grad():
        next(model.parameters())[0].add_(1e-3)
    ckpt.save_checkpoint(path, {"kind": "classifier"}, model.state_dict())
    assert ckpt.weights_sha256(path) != h


def test_overwrite_recovery_and_stale_temp_dirs(tmp_path):
    model, _, _ = make_state()
    path = tmp_path / "checkpoint"
    ckpt.save_checkpoint(path, {"kind": "classifier", "step": 1}, model.state_dict())
    ckpt.save_checkpoint(path, {"kind": "classifier", "step": 2}, model.state_dict())
    assert ckpt.load_meta(path)["step"] == 2
    # a kill between save_checkpoint's two renames leaves only .checkpoint.old: loading recovers it
    os.rename(path, tmp_path / ".checkpoint.old")
    assert ckpt.load_meta(path)["step"] == 2 and path.is_dir()
    # a kill while writing leaves a temp dir; the next save clears it
    (tmp_path / ".checkpoint.tmpdead").mkdir()
    (tmp_path / ".checkpoint.tmpdead" / "model.safetensors").write_bytes(b"half")
    ckpt.save_checkpoint(path, {"kind": "classifier", "step": 3}, model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_broken_checkpoints_give_checkpoint_error(tmp_path):
    model, opt, _ = make_state()
    with pytest.raises(ckpt.CheckpointError, match="no meta.json"):
        ckpt.load_meta(tmp_path / "absent")
    path = ckpt.save_checkpoint(tmp_path / "c", {"kind": "classifier", "arch": {"classifier": "small_cnn",
                                                 "dataset": "fashion_mnist"}}, model.state_dict(), None,
                                opt.state_dict())
    meta_text = (path / "meta.json").read_text()
    (path / "meta.json").write_text('{"kind": "classif')
    with pytest.raises(ckpt.CheckpointError, match="meta.json"):
        ckpt.load_meta(path)
    with pytest.raises(ckpt.CheckpointError, match="meta.json"):
        load_classifier(path)
    (path / "meta.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ckpt.CheckpointError, match="meta.json"):
        ckpt.load_meta(path)
    (path / "meta.json").write_text(json.dumps({"kind": "classifier"}))
    with pytest.raises(ckpt.CheckpointError, match="optimizer"):
        ckpt.load_optimizer(path)
    (path / "meta.json").write_text(meta_text)
    for name in ("model.safetensors", "optimizer.safetensors"):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])  # truncated by a full disk
        with pytest.raises(ckpt.CheckpointError, match=name):
            ckpt.load_weights(path, "model") if name == "model.safetensors" else ckpt.load_optimizer(path)
        (path / name).write_bytes(data)
    (path / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_weights(path, "ema")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.weights_sha256(path)


def test_loading_the_wrong_kind(tmp_path):
    model, _, _ = make_state()
    path = ckpt.save_checkpoint(tmp_path / "c", {"kind": "classifier", "arch": {"classifier": "small_cnn",
                                                 "dataset": "fashion_mnist", "num_classes": 10}},
                                model.state_dict())
    with pytest.raises(ckpt.CheckpointError, match="not a diffusion model"):
        load_unet(path)
    loaded = load_classifier(path)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
