"""A tritonserver that dies, however it dies, takes its python-backend stubs and its /dev/shm regions with it
(dbp.serving.watchdog, started by the launcher next to every server). Real servers, numpy-only toy models.

Without the watchdog (its start in TritonServer.start() commented out), test_sigkilled_server_leaves_no_stub
_and_no_shm fails: 10 s after the SIGKILL the toy model's stub is still running with parent 1 and the server's
shm region is still in /dev/shm. The stub checks its parent with kill(pid, 0), which succeeds on the unreaped
zombie the killed server becomes, so it never notices; a stub that does notice exits without unlinking its
regions. test_sigkilled_launcher_... passed without the watchdog too (the server's parent-death SIGTERM was
enough for a toy model); it and test_watchdog_kills_a_server_that_outlives_its_launcher (a stand-in server
that ignores SIGTERM) guard the watchdog's second duty.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from dbp.serving.launcher import SHM_DIR, SHM_PREFIX, free_ports
from helpers import ROOT, toy_repo

DBP_TRITON = str(Path(sys.executable).with_name("dbp-triton"))


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftovers(procs: list[psutil.Process], prefix: str) -> tuple[list[str], list[str]]:
    """(live processes among procs or naming prefix, regions with prefix)."""
    named = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and prefix in " ".join(p.info["cmdline"] or ()):
            named.append(p)
    live = []
    for p in {p.pid: p for p in procs + named}.values():
        try:
            if alive(p):
                live.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
        except psutil.NoSuchProcess:  # exited between the two looks
            pass
    return live, sorted(f.name for f in SHM_DIR.glob(prefix + "*"))


def wait_clean(procs: list[psutil.Process], prefix: str, timeout: float) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(procs, prefix)
        if left == ([], []) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def server_tree(pid: int) -> tuple[psutil.Process, list[psutil.Process]]:
    server = psutil.Process(pid)
    stubs = [c for c in server.children(recursive=True) if c.name().startswith("triton_python_b")]
    return server, stubs


def test_sigkilled_server_leaves_no_stub_and_no_shm(triton_server_factory, tmp_path):
    srv = triton_server_factory(toy_repo(tmp_path / "repo"), model_control_mode="none", ready_timeout=120)
    server, stubs = server_tree(srv.proc.pid)
    assert stubs and list(SHM_DIR.glob(srv.shm_prefix + "*")), "a python model runs in a stub with shared memory"
    # a crash as the drills make it: nobody calls stop() or reaps the server afterwards
    os.kill(server.pid, signal.SIGKILL)
    procs, regions = wait_clean(stubs, srv.shm_prefix, timeout=10)
    assert procs == [], f"stubs of the killed server still alive 10 s later: {procs}"
    assert regions == [], f"its regions still in {SHM_DIR}: {regions}"


def test_sigkilled_launcher_leaves_no_server_stub_or_shm(tmp_path):
    """The process that started Triton (here the dbp-triton CLI, as `make up` runs it) SIGKILLed: the server
    gets SIGTERM from its parent-death signal, and the watchdog finishes off whatever remains."""
    repo = toy_repo(tmp_path / "repo")
    h, g, m = free_ports(3)
    cli = subprocess.Popen([DBP_TRITON, "--repo", str(repo), "--http-port", str(h), "--grpc-port", str(g),
                            "--metrics-port", str(m), "--model-control-mode", "none", "--quiet",
                            "--run-dir", str(tmp_path / "run")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = cli.stderr.readline()
        assert "Triton ready" in line, line + cli.stderr.read()
        server = next(c for c in psutil.Process(cli.pid).children() if c.name() == "tritonserver")
        _, stubs = server_tree(server.pid)
        prefix = next(a.split("=", 2)[2] for a in server.cmdline() if "shm-region-prefix-name=" in a)
        assert prefix.startswith(SHM_PREFIX) and stubs and list(SHM_DIR.glob(prefix + "*"))
        cli.kill()
        cli.wait()
        procs, regions = wait_clean([server, *stubs], prefix, timeout=60)
        assert procs == [], f"server or stubs still alive after the launcher was killed: {procs}"
        assert regions == [], f"regions still in {SHM_DIR}: {regions}"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        cli.stderr.close()


WATCHED = r"""
import os, subprocess, sys, time
from dbp.serving import watchdog
# a "server" that ignores SIGTERM, in a session of its own, with a child in that session (its "stub")
server = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & wait"], start_new_session=True)
time.sleep(0.3)
dog = subprocess.Popen([sys.executable, "-S", "-E", watchdog.__file__, str(server.pid),
                        str(watchdog.start_time(server.pid)), str(os.getpid()), sys.argv[1], "1"],
                       start_new_session=True)
print(server.pid, dog.pid, flush=True)
time.sleep(300)
"""


def test_watchdog_kills_a_server_that_outlives_its_launcher(tmp_path):
    """The launcher SIGKILLed and the server deaf to the SIGTERM of its parent-death signal (a hung shutdown):
    after its grace (1 s here) the watchdog SIGKILLs the server's whole session and unlinks its regions."""
    token = os.urandom(6).hex()
    prefix = f"{SHM_PREFIX}{token}_"
    region = SHM_DIR / (prefix + "x")
    region.write_bytes(b"")
    launcher = subprocess.Popen([sys.executable, "-c", WATCHED, token], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
    try:
        server_pid, dog_pid = map(int, launcher.stdout.readline().split())
        server, dog = psutil.Process(server_pid), psutil.Process(dog_pid)
        session = [server, *server.children()]
        assert len(session) == 2 and all(alive(p) for p in session + [dog])
        launcher.kill()
        launcher.wait()
        time.sleep(0.5)
        assert alive(server), "the server must get its grace"
        procs, regions = wait_clean(session + [dog], prefix, timeout=10)
        assert procs == [] and regions == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        launcher.stdout.close()
        region.unlink(missing_ok=True)
