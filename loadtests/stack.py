"""A local serving stack on free loopback ports: Triton (the project's launcher) + the gateway (real uvicorn).

  with Stack(repo="model_repository", run_dir=...) as s:
      s.gateway_url, s.triton.metrics_url ...
      s.kill_triton(); s.restart_triton()           # fault drills: same ports, gateway untouched

Used by `python -m loadtests.run` and `python -m loadtests.drills`; tests use the same class.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from dbp.serving.launcher import ServerConfig, TritonServer, free_ports
from service.stack import stop_process

ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
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


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants (tritonserver + its python stubs)."""
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


@dataclass
class GatewayConfig:
    max_in_flight: int = 32
    request_timeout_s: float = 60.0
    probe_interval_s: float = 0.5
    extra_env: dict = field(default_factory=dict)  # any other DBP_GATEWAY_* setting


class GatewayProcess:
    """`python -m service` (uvicorn) in its own session, on a free loopback port, settings through the env."""

    def __init__(self, triton_grpc: list[str], cfg: GatewayConfig, repo: Optional[Path], log_path: Path,
                 port: Optional[int] = None):
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, PYTHONPATH=str(ROOT),
                   DBP_GATEWAY_TRITON_URLS=",".join(triton_grpc),
                   DBP_GATEWAY_MAX_IN_FLIGHT=str(cfg.max_in_flight),
                   DBP_GATEWAY_REQUEST_TIMEOUT_S=str(cfg.request_timeout_s),
                   DBP_GATEWAY_PROBE_INTERVAL_S=str(cfg.probe_interval_s),
                   DBP_GATEWAY_LOG_LEVEL="warning", DBP_GATEWAY_HOST="127.0.0.1", DBP_GATEWAY_PORT=str(self.port))
        if repo is not None:
            env["DBP_GATEWAY_MODEL_REPOSITORY"] = str(repo)
        env.update({k: str(v) for k, v in cfg.extra_env.items()})
        self.env = env
        self.proc: Optional[subprocess.Popen] = None

    def start(self, ready_timeout: float = 120.0) -> "GatewayProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise StackError(f"gateway exited with code {self.proc.returncode}; log:\n{self.log_tail()}")
            if http_status(self.url + "/readyz") == 200:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"gateway not ready after {ready_timeout:.0f} s; log:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        rc = stop_process(self.proc)
        self._log.close()
        self.proc = None
        return rc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Stack:
    """Triton with `repo` + one gateway in front of it, all on free loopback ports; stop() kills both."""

    def __init__(self, repo: str | Path = ROOT / "model_repository", run_dir: Optional[str | Path] = None,
                 gateway: Optional[GatewayConfig] = None, triton_ready_timeout: float = 300.0):
        self.repo = Path(repo).resolve()
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="dbp-stack-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.gateway_cfg = gateway or GatewayConfig()
        self.ports = free_ports(3)
        self.triton_ready_timeout = triton_ready_timeout
        self.triton: Optional[TritonServer] = None
        self.gateway: Optional[GatewayProcess] = None
        self.triton_starts = 0
        self.extra_gateways: list[GatewayProcess] = []

    def _new_triton(self) -> TritonServer:
        h, g, m = self.ports
        self.triton_starts += 1
        return TritonServer(ServerConfig(repo=str(self.repo), http_port=h, grpc_port=g, metrics_port=m,
                                         run_dir=str(self.run_dir / f"triton{self.triton_starts}"),
                                         model_control_mode="poll", poll_secs=1,
                                         ready_timeout=self.triton_ready_timeout))

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    @property
    def triton_metrics_target(self) -> str:
        return f"127.0.0.1:{self.ports[2]}"

    @property
    def gateway_target(self) -> str:
        assert self.gateway is not None
        return f"127.0.0.1:{self.gateway.port}"

    def start(self) -> "Stack":
        try:
            self.triton = self._new_triton().start()
            self.gateway = GatewayProcess([self.triton.grpc_url], self.gateway_cfg, self.repo,
                                          self.run_dir / "gateway.log").start()
        except BaseException:
            self.stop()
            raise
        return self

    def extra_gateway(self, cfg: GatewayConfig) -> GatewayProcess:
        """Another gateway (other settings, e.g. a small in-flight limit) in front of the same Triton."""
        assert self.triton is not None
        gw = GatewayProcess([self.triton.grpc_url], cfg, self.repo,
                            self.run_dir / f"gateway-extra{len(self.extra_gateways) + 1}.log")
        self.extra_gateways.append(gw)
        return gw.start()

    def kill_triton(self) -> None:
        """SIGKILL to tritonserver only, as a crash would; its stubs outlive it (docs/serving.md)."""
        assert self.triton is not None and self.triton.proc is not None
        os.kill(self.triton.proc.pid, signal.SIGKILL)
        self.triton.proc.wait()
        self.triton.stop()  # kills the stubs it left and removes its shared memory (its watchdog would too)

    def restart_triton(self) -> float:
        """A new tritonserver on the same ports; returns seconds until it was ready."""
        self.triton = self._new_triton().start()
        return float(self.triton.startup_s or 0.0)

    def rss(self) -> dict[str, int]:
        out = {}
        if self.gateway and self.gateway.proc:
            out["gateway"] = tree_rss(self.gateway.pid)
        if self.triton and self.triton.proc:
            out["triton"] = tree_rss(self.triton.proc.pid)
        return out

    def stop(self) -> None:
        for gw in self.extra_gateways:
            gw.stop()
        if self.gateway is not None:
            self.gateway.stop()
        if self.triton is not None:
            self.triton.stop()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
