"""dbp.serving.launcher: failure modes, shared-memory clean-up and the dbp-triton CLI (numpy-only toy models)."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dbp.serving.launcher import (SHM_PREFIX, ServerConfig, TritonServer, TritonServerError, free_ports,
                                  remove_stale_shm_regions)
from helpers import ROOT, toy_repo

DBP_TRITON = str(Path(sys.executable).with_name("dbp-triton"))


def test_server_that_cannot_load_fails_loudly_with_log_tail(tmp_path):
    repo = toy_repo(tmp_path / "repo", "raise RuntimeError('toy model is broken on purpose')\n")
    h, g, m = free_ports(3)
    srv = TritonServer(ServerConfig(repo=str(repo), http_port=h, grpc_port=g, metrics_port=m,
                                    model_control_mode="none", ready_timeout=60, run_dir=str(tmp_path / "run")))
    with pytest.raises(TritonServerError, match="broken on purpose"):
        srv.start()
    assert not srv.is_alive()


def test_missing_version_is_a_clear_error(tmp_path):
    repo = toy_repo(tmp_path / "repo")
    shutil.rmtree(repo / "toy" / "1")
    with pytest.raises(TritonServerError, match="export"):
        TritonServer(ServerConfig(repo=str(repo))).start()


def test_stale_shm_regions_of_dead_servers_only_are_removed(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    dead, live = "0123456789ab", "ba9876543210"
    (shm / f"{SHM_PREFIX}{dead}_x").write_bytes(b"")
    (shm / f"{SHM_PREFIX}{live}_y").write_bytes(b"")
    (shm / "triton_python_backend_shm_region_someone-else").write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{SHM_PREFIX}{live}_y"])
    try:
        time.sleep(0.2)
        removed = remove_stale_shm_regions(shm)
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in removed] == [f"{SHM_PREFIX}{dead}_x"]
    assert sorted(p.name for p in shm.iterdir()) == sorted([f"{SHM_PREFIX}{live}_y",
                                                            "triton_python_backend_shm_region_someone-else"])


def test_cli_serves_until_interrupted(tmp_path):
    """The dbp-triton console script, as `make up` runs it."""
    repo = toy_repo(tmp_path / "repo")
    h, g, m = free_ports(3)
    proc = subprocess.Popen([DBP_TRITON, "--repo", str(repo), "--http-port", str(h),
                             "--grpc-port", str(g), "--metrics-port", str(m), "--quiet",
                             "--run-dir", str(tmp_path / "run")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # printed once ready
        assert "Triton ready" in line, line + proc.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{h}/v2/models/toy/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_make_targets_and_module_form_start_the_same_launcher():
    r = subprocess.run(["make", "-n", "triton"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ".venv/bin/dbp-triton --repo model_repository" in r.stdout
    r = subprocess.run(["make", "-n", "up"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "-m service.stack" in r.stdout  # Triton + gateway (service/stack.py starts this same launcher)
    r = subprocess.run([sys.executable, "-m", "dbp.serving.launcher", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "usage: dbp-triton" in r.stdout and "--repo" in r.stdout


def test_server_factory_runs_servers_side_by_side_on_free_ports(triton_server_factory, tmp_path):
    """The shared fixture other suites (gateway, load tests) start their servers with."""
    a = triton_server_factory(toy_repo(tmp_path / "a"), model_control_mode="none", ready_timeout=120)
    b = triton_server_factory(toy_repo(tmp_path / "b"), model_control_mode="none", ready_timeout=120)
    ports = {a.config.http_port, a.config.grpc_port, a.config.metrics_port,
             b.config.http_port, b.config.grpc_port, b.config.metrics_port}
    assert len(ports) == 6
    for srv in (a, b):
        assert srv.is_alive()
        with urllib.request.urlopen(f"http://{srv.http_url}/v2/models/toy/ready", timeout=5) as r:
            assert r.status == 200
