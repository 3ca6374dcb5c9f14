"""Start, wait for and stop the gateway process (`python -m service`, a real uvicorn); standard library only.

  gw = GatewayProcess({"TRITON_URLS": "127.0.0.1:8001"}, log_path=run_dir / "gateway.log").start()
  gw.url, gw.port, gw.pid, gw.log_tail()        # port=0 (the default): any free port, read from uvicorn's log
  gw.stop()                                     # SIGTERM, SIGKILL to its process group after grace_s

What `TritonServer` (dbp/serving/launcher.py) is for tritonserver, this is for the gateway: the one way
`make up` (service/stack.py), the load tests and drills (loadtests/stack.py), the gateway benchmark and the
tests (tests/service/gateway_testing.py) start it. `ServerProcess` is the general part (its own session, killed
with its parent, readiness with a deadline and a pid check, errors that name the log); service/stack.py also
runs the Triton launcher (`dbp-triton`) with it. No torch, no dbp: the gateway's image carries only service/.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "DBP_GATEWAY_"
_LISTENING = re.compile(r"Uvicorn running on http://\S+:(\d+)")


class ServerProcessError(RuntimeError):
    """A server exited or was not ready in time; the message names its log and carries the log's tail."""


def die_with_parent() -> None:
    """preexec_fn: SIGTERM to the child when the thread that started it dies, so a killed parent (a SIGKILLed
    pytest, a crashed stack) leaves no server behind. Linux only; elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def http_status(url: str, timeout: float = 3.0) -> Optional[int]:
    """Status code of a GET, None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def stop_process(proc: Optional[subprocess.Popen], grace_s: float = 20.0) -> Optional[int]:
    """SIGTERM (uvicorn and Triton drain and exit), SIGKILL to its whole session if it has not gone after
    grace_s; the exit code (None for no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class ServerProcess:
    """`cmd` in its own session (so stop() can kill its whole group), killed when its parent dies.

    Output goes to `log_path` (appended; stderr too) or, when None, to this process's terminal. start()
    returns once `ready_url` answers 200 and raises ServerProcessError (naming the log, with its tail) if the
    process exits first or the deadline passes; a server that did not become ready is stopped. stop() sends
    SIGTERM and, after stop_grace_s, SIGKILL to the process group.
    """

    def __init__(self, cmd: Sequence[str], *, name: str, ready_url: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, log_path: Optional[Path] = None, cwd: Path = ROOT,
                 stop_grace_s: float = 20.0):
        self.cmd = list(cmd)
        self.stop_grace_s = stop_grace_s
        self.name = name
        self._ready_url = ready_url
        self.env = dict(os.environ if env is None else env)
        self.log_path = Path(log_path) if log_path is not None else None
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None

    @property
    def ready_url(self) -> Optional[str]:
        return self._ready_url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        """The last n lines of the log ('' without a log file)."""
        if self.log_path is None:
            return ""
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-n:])
        except OSError:
            return ""

    def _error(self, what: str) -> ServerProcessError:
        if self.log_path is None:
            return ServerProcessError(f"{self.name} {what} (its output went to this terminal)")
        return ServerProcessError(f"{self.name} {what}; log tail ({self.log_path}):\n{self.log_tail()}")

    def start(self, ready_timeout: Optional[float] = 120.0) -> "ServerProcess":
        """Start it; with a ready_timeout, wait_ready(ready_timeout) too (stopping it if that fails)."""
        if self.proc is not None:
            raise ServerProcessError(f"{self.name} already started")
        if self.log_path is None:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, start_new_session=True,
                                         preexec_fn=die_with_parent)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=die_with_parent)
        if ready_timeout is not None:
            try:
                self.wait_ready(ready_timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def _check_running(self) -> None:
        assert self.proc is not None, "not started"
        if self.proc.poll() is not None:
            raise self._error(f"exited with code {self.proc.returncode} before it was ready")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            url = self.ready_url
            if url is not None and http_status(url) == 200:
                return
            if time.monotonic() > deadline:
                raise self._error(f"was not ready after {timeout:.0f} s ({url or 'no address yet'})")
            time.sleep(0.25)

    def stop(self, grace_s: Optional[float] = None) -> Optional[int]:
        """SIGTERM, SIGKILL to its session after grace_s (default stop_grace_s); the exit code (None if it was
        not started or already stopped)."""
        rc = stop_process(self.proc, self.stop_grace_s if grace_s is None else grace_s)
        self.proc = None
        return rc


class GatewayProcess(ServerProcess):
    """`python -m service`; `settings` are the gateway's settings (DBP_GATEWAY_ names, the prefix optional, any
    case; values turned to strings) over `env` (default: this process's environment).

    port=0 lets uvicorn pick a free port, read from its "Uvicorn running on" line: that needs a log file and
    LOG_LEVEL info or lower (the default). Ready = GET /readyz answers 200 (a ready Triton behind it).
    """

    def __init__(self, settings: Optional[Mapping[str, object]] = None, *, host: str = "127.0.0.1", port: int = 0,
                 env: Optional[Mapping[str, str]] = None, log_path: Optional[Path] = None, cwd: Path = ROOT):
        full = dict(os.environ if env is None else env)
        full.update({k.upper() if k.upper().startswith(ENV_PREFIX) else ENV_PREFIX + k.upper(): str(v)
                     for k, v in (settings or {}).items()})
        full.update({ENV_PREFIX + "HOST": host, ENV_PREFIX + "PORT": str(port)})
        if port == 0 and (log_path is None or full.get(ENV_PREFIX + "LOG_LEVEL", "info") not in ("trace", "debug",
                                                                                                  "info")):
            raise ValueError("port=0 needs a log_path and LOG_LEVEL info or lower (the port is read from the log)")
        super().__init__([sys.executable, "-m", "service"], name="the gateway", env=full, log_path=log_path,
                         cwd=cwd)
        self.host = host
        self._asked_port = port
        self.port: Optional[int] = port or None  # known once it listens
        self._log_offset = 0  # where this run's output starts in an appended log

    def start(self, ready_timeout: Optional[float] = 120.0) -> "GatewayProcess":
        self.port = self._asked_port or None
        if self.port is None and self.log_path.exists():
            self._log_offset = self.log_path.stat().st_size  # an earlier run's "Uvicorn running on" is not ours
        super().start(ready_timeout)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready_url(self) -> Optional[str]:
        return self.url + "/readyz" if self.port else None

    def _check_running(self) -> None:
        super()._check_running()
        if self.port is None:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                m = _LISTENING.search(f.read().decode(errors="replace"))
            if m:
                self.port = int(m.group(1))

    def wait_listening(self, timeout: float = 60.0) -> None:
        """Until the process runs and its port is known (with port=0: until uvicorn says where it listens)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            if self.port is not None:
                return
            if time.monotonic() > deadline:
                raise self._error(f"did not start listening within {timeout:.0f} s")
            time.sleep(0.1)
