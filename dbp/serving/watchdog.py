"""Make a tritonserver's python-backend stubs and shared memory die with it.

  python -S -E dbp/serving/watchdog.py SERVER_PID SERVER_START LAUNCHER_PID TOKEN GRACE_S

started by dbp.serving.launcher next to every tritonserver. It polls the server and, once the server has
exited for whatever reason (SIGKILL included, and also while it is an unreaped zombie), SIGKILLs every
process left in the server's session or naming its shm prefix and unlinks /dev/shm/<prefix>*. If the
launching process dies first, the server gets SIGTERM from its parent-death signal; the watchdog gives it
GRACE_S to exit and then does the same. Why a process of its own and not only a thread of the launcher: a
thread dies with a SIGKILLed launcher, and then nobody would be left to clean up (docs/serving.md).

Stdlib only and run by path with -S: it must start in milliseconds and must not import dbp or torch.
The launcher imports cleanup() from here for its own, synchronous stop().
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

SHM_DIR = Path("/dev/shm")
# Keep the stock prefix in front so generic `triton_python_backend_shm_region_*` clean-ups still match.
SHM_PREFIX = "triton_python_backend_shm_region_dbp"
POLL_S = 0.2


def shm_prefix(token: str) -> str:
    return f"{SHM_PREFIX}{token}_"


def _stat(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, session id, start time in clock ticks since boot) from /proc/<pid>/stat, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0].decode(), int(fields[3]), int(fields[19])


def start_time(pid: int) -> Optional[int]:
    """The start time that tells this process from a later one that reuses its pid."""
    st = _stat(pid)
    return None if st is None else st[2]


def is_running(pid: int, start: int) -> bool:
    """False once the process has exited, even while it is a zombie nobody reaped: the stubs check their
    parent with kill(pid, 0), which succeeds on a zombie, so an unreaped server keeps its stubs alive."""
    st = _stat(pid)
    return st is not None and st[2] == start and st[0] not in ("Z", "X")


def server_processes(server_pid: int, server_start: int, prefix: str) -> list[int]:
    """Live processes of one server: its session (tritonserver runs in a session of its own and the stubs it
    forks stay in it; started no earlier than the server, so a reused session id cannot match) or any
    process whose argv names the server's shm prefix (a stub's argv names its region)."""
    me, needle, out = os.getpid(), prefix.encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        if st[1] == server_pid and st[2] >= server_start:
            out.append(pid)
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def remove_regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    removed = []
    for f in shm_dir.glob(prefix + "*"):
        try:
            f.unlink()
            removed.append(f)
        except FileNotFoundError:
            pass
    return removed


def cleanup(server_pid: int, server_start: int, prefix: str, wait_s: float = 5.0,
            shm_dir: Path = SHM_DIR) -> tuple[list[int], list[Path]]:
    """SIGKILL what is left of a server (stubs ignore SIGTERM), wait until it is gone, unlink its regions.
    Returns (pids killed, regions removed)."""
    killed: set[int] = set()
    deadline = time.monotonic() + wait_s
    while (pids := server_processes(server_pid, server_start, prefix)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    # unlinked only once the stubs are dead: a live stub could still grow its shm by a new region
    return sorted(killed), remove_regions(prefix, shm_dir)


def watch(server_pid: int, server_start: int, launcher_pid: int, token: str, grace_s: float) -> int:
    orphaned_at = None
    while is_running(server_pid, server_start):
        if orphaned_at is None and os.getppid() != launcher_pid:
            orphaned_at = time.monotonic()  # the launcher died; the server got SIGTERM from its death signal
        if orphaned_at is not None and time.monotonic() - orphaned_at > grace_s:
            break
        time.sleep(POLL_S)
    killed, removed = cleanup(server_pid, server_start, shm_prefix(token))
    if killed or removed:
        print(f"watchdog: tritonserver {server_pid} gone; killed {killed}, removed {len(removed)} shm regions",
              file=sys.stderr, flush=True)
    return 0


def main(argv: list[str]) -> int:
    # its own session already keeps a Ctrl-C to the launcher's terminal away; a hangup must not stop it either
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    server_pid, server_start, launcher_pid, token, grace_s = argv
    return watch(int(server_pid), int(server_start), int(launcher_pid), token, float(grace_s))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
