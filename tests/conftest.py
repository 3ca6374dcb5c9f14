"""Shared fixtures: real (tiny) models trained once per session through the real training CLIs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# shared fixtures of tests/helpers.py, for every test directory (tests/ is on sys.path: pytest puts a
# rootdir conftest's folder there; `training` imports through pyproject's pythonpath)
from helpers import export_repo_factory, triton_server_factory  # noqa: F401

pytest_plugins = ["leak_check"]  # the run fails if it leaves processes or shm regions behind (tests/leak_check.py)

# Two cores and several suites: one thread per test process keeps timings sane and results deterministic.
TEST_THREADS = int(os.environ.get("DBP_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _test_threads():
    """The training CLIs the fixtures and tests call set torch's threads for the whole process (--threads 1):
    put DBP_TEST_THREADS back before every test, so a 2-thread run really runs its tests on 2 threads."""
    torch.set_num_threads(TEST_THREADS)
    yield


@pytest.fixture(scope="session")
def fashion_test():
    from dbp.data import load_fashion_mnist
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def tiny_classifier_ckpt(tmp_path_factory) -> Path:
    """A small_cnn trained for 150 steps (~80% test accuracy): a real, imperfect classifier."""
    from training import train_classifier
    out = tmp_path_factory.mktemp("cls")
    train_classifier.main(["--preset", "smoke", "--steps", "150", "--batch_size", "64", "--ckpt_every", "1000",
                           "--out_dir", str(out), "--threads", "1"])
    return out / "checkpoint"


@pytest.fixture(scope="session")
def tiny_diffusion_ckpt(tmp_path_factory) -> Path:
    """A small UNet after a few dozen steps on t <= 100: real weights, weak denoiser."""
    from training import train_diffusion
    out = tmp_path_factory.mktemp("diff")
    train_diffusion.main(["--preset", "smoke", "--steps", "30", "--out_dir", str(out), "--threads", "1"])
    return out / "checkpoint"


@pytest.fixture(scope="session")
def tiny_models(tiny_classifier_ckpt, tiny_diffusion_ckpt):
    from dbp.models import load_classifier, load_unet
    return load_unet(tiny_diffusion_ckpt), load_classifier(tiny_classifier_ckpt)
