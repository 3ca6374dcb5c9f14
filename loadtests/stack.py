"""A local serving stack on free loopback ports: Triton (the project's launcher) + the gateway (real uvicorn).

  with Stack(repo="model_repository", run_dir=...) as s:
      s.gateway_url, s.triton.metrics_url ...
      s.kill_triton(); s.restart_triton()           # fault drills: same ports, gateway untouched

Used by `python -m loadtests.run` and `python -m loadtests.drills`; tests use the same class.
"""
from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from dbp.serving.launcher import ServerConfig, TritonServer, free_ports
from service.process import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent


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

    def process(self, triton_grpc: list[str], repo: Optional[Path], log_path: Path) -> GatewayProcess:
        """The gateway with these settings in front of `triton_grpc`, on a free loopback port, logging to log_path."""
        settings = {"TRITON_URLS": ",".join(triton_grpc), "MAX_IN_FLIGHT": self.max_in_flight,
                    "REQUEST_TIMEOUT_S": self.request_timeout_s, "PROBE_INTERVAL_S": self.probe_interval_s,
                    "LOG_LEVEL": "warning"}
        if repo is not None:
            settings["MODEL_REPOSITORY"] = repo
        return GatewayProcess(settings, port=free_ports(1)[0], log_path=log_path,
                              env={**os.environ, **{k: str(v) for k, v in self.extra_env.items()}})


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
            self.gateway = self.gateway_cfg.process([self.triton.grpc_url], self.repo,
                                                    self.run_dir / "gateway.log").start()
        except BaseException:
            self.stop()
            raise
        return self

    def extra_gateway(self, cfg: GatewayConfig) -> GatewayProcess:
        """Another gateway (other settings, e.g. a small in-flight limit) in front of the same Triton."""
        assert self.triton is not None
        gw = cfg.process([self.triton.grpc_url], self.repo,
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
