"""A real Prometheus (Debian's /usr/bin/prometheus) on a free loopback port with the project's config.

  with PrometheusServer({"dbp-gateway": "127.0.0.1:41081", "triton": "127.0.0.1:41090"}, scrape="1s") as prom:
      prom.query("up"); prom.query_range(expr, start, end, step)

The project's monitoring/prometheus.yml is copied with its targets rewritten per job, its intervals shortened
and its rule files made absolute; storage goes to a temporary folder removed on stop. Also: the dashboard's
queries with Grafana's variables substituted (dashboard_targets), used by the live test and the plot.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import yaml

MON = Path(__file__).resolve().parent
CONFIG = MON / "prometheus.yml"
DASHBOARD = MON / "grafana" / "dashboards" / "dbp-serving.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class PrometheusError(RuntimeError):
    pass


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rewrite_config(targets: dict[str, str], scrape: str = "1s", config: Path = CONFIG) -> dict:
    """The project's config with each job's targets replaced (every job must be given one)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["global"]["scrape_interval"] = scrape
    cfg["global"]["evaluation_interval"] = scrape
    cfg["global"]["scrape_timeout"] = scrape
    cfg["rule_files"] = [str((config.parent / r).resolve()) for r in cfg.get("rule_files", [])]
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    if set(targets) != jobs:
        raise PrometheusError(f"targets for jobs {sorted(targets)} but the config has {sorted(jobs)}")
    for job in cfg["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return cfg


class PrometheusServer:
    def __init__(self, targets: dict[str, str], scrape: str = "1s", work_dir: Optional[Path] = None):
        self.targets, self.scrape = targets, scrape
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._own = work_dir is None
        self.dir = Path(work_dir or tempfile.mkdtemp(prefix="dbp-prom-"))
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0) -> "PrometheusServer":
        if not Path(PROMETHEUS).exists():
            raise PrometheusError(f"{PROMETHEUS} not found: `make system` (apt-get install prometheus)")
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(rewrite_config(self.targets, self.scrape)))
        self.log_path = self.dir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg_path}",
                                      f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
                                      "--log.level=warn"],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout} s: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path>; returns `data`, raises with Prometheus' error message otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
            raise PrometheusError(f"{path} {params}: HTTP {e.code} {body.get('errorType')}: {body.get('error')}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: Optional[float] = None) -> list[dict]:
        return self.api("query", query=expr, **({"time": at} if at else {}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets_health(self) -> dict[str, str]:
        return {t["labels"]["job"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            res = self.query(expr)
            if res or time.monotonic() > deadline:
                return res
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self._log.close()
            self.proc = None
        if self._own:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def dashboard_targets(rate_interval: str = "10s", path: Path = DASHBOARD) -> list[dict]:
    """Every query of the dashboard: panel id/title, refId, instant flag, expr with Grafana's variables set."""
    d = json.loads(path.read_text())
    panels = []
    for p in d["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    out = []
    for p in panels:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
            if "$" in expr:
                raise PrometheusError(f"panel {p['id']} uses a variable this substitution does not know: {expr}")
            out.append({"panel": p["id"], "title": p["title"], "ref": t["refId"], "legend": t.get("legendFormat", ""),
                        "instant": bool(t.get("instant")) and not t.get("range"), "expr": expr, "unit":
                        p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")})
    return out
