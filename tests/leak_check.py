"""End-of-run leak check: the run fails when, after every fixture has been torn down, a process the suite
started is still alive or a /dev/shm region of one of its Triton servers is still there.

Registered from tests/conftest.py (`pytest_plugins`). Other suites run servers on the same machine at the same
time, so "started by this run" is decided by marks, never by name or by "new since the start":
  processes  descendants of the pytest process; any process whose environment carries this run's
             DBP_TEST_SESSION id (put in os.environ at start, so everything the suite starts inherits it,
             even after it was reparented to init: the stubs of a killed server, a killed launcher's server);
             any process whose argv names one of this run's shm regions (a stub started with its own env)
  regions    the launcher puts DBP_TRITON_SHM_TAG (set here) at the front of each server's shm token, so this
             run's regions are SHM_PREFIX + tag + ... (and were not there at start)
Zombies are not counted: they are dead and hold nothing but a pid. Leftovers get GRACE_S to finish exiting;
what remains is reported (pid, command line), then SIGKILLed and unlinked, so a failing run does not leave
~400 MB stubs behind either.
"""
from __future__ import annotations

import os
import secrets
import sys
import time

import psutil
import pytest

from dbp.serving.launcher import SHM_DIR, SHM_PREFIX, SHM_TAG_ENV

SESSION_ENV = "DBP_TEST_SESSION"
GRACE_S = 5.0

_run: dict = {}


def pytest_configure(config):
    # before collection: module-level code and the first fixtures may already start processes
    _run["session"] = os.environ[SESSION_ENV] = secrets.token_hex(8)
    _run["tag"] = os.environ[SHM_TAG_ENV] = secrets.token_hex(3)
    _run["regions_at_start"] = {f.name for f in SHM_DIR.glob(SHM_PREFIX + "*")}


def _processes() -> list[psutil.Process]:
    me = os.getpid()
    try:
        descendants = {p.pid for p in psutil.Process(me).children(recursive=True)}
    except psutil.Error:
        descendants = set()
    needle = SHM_PREFIX + _run["tag"]
    out = []
    for p in psutil.process_iter(["status", "cmdline"]):
        if p.pid == me or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if (p.pid in descendants or needle in " ".join(p.info["cmdline"] or ())
                    or p.environ().get(SESSION_ENV) == _run["session"]):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _regions() -> list[str]:
    return sorted(f.name for f in SHM_DIR.glob(SHM_PREFIX + _run["tag"] + "*")
                  if f.name not in _run["regions_at_start"])


def _describe(p: psutil.Process) -> str:
    try:
        return f"  pid {p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:300]}"
    except psutil.Error:
        return f"  pid {p.pid}: (exited while being reported)"


def find_leaks(grace_s: float = GRACE_S) -> tuple[list[psutil.Process], list[str]]:
    deadline = time.monotonic() + grace_s
    while True:
        procs, regions = _processes(), _regions()
        if (not procs and not regions) or time.monotonic() > deadline:
            return procs, regions
        time.sleep(0.25)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # outermost wrapper: runs after the session fixtures' teardown and after the terminal summary
    result = yield
    if not _run:
        return result
    procs, regions = find_leaks()
    if procs or regions:
        lines = [f"leak check: the test run left {len(procs)} process(es) and {len(regions)} shm region(s) behind "
                 f"({GRACE_S:.0f} s after the last teardown); a fixture or test did not stop what it started:"]
        lines += [_describe(p) for p in procs] + [f"  {SHM_DIR / r}" for r in regions]
        lines.append("  (now killed and removed)")
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_sep("=", "leak check failed", red=True, bold=True)
            for line in lines:
                tr.write_line(line, red=True)
        else:
            print("\n".join(lines), file=sys.stderr)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        for r in regions:
            try:
                (SHM_DIR / r).unlink()
            except FileNotFoundError:
                pass
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
