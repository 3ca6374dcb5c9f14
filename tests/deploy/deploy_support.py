"""Helpers of the deployment tests (tests/deploy/): file loading, Dockerfile parsing, the files a docker build
sends, a real Prometheus on a free loopback port."""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@contextlib.contextmanager
def running_prometheus(config: Path, workdir: Path, ready_timeout: float = 60.0) -> Iterator[str]:
    """Debian's prometheus with `config`, on a free loopback port; yields its base URL, stops it after."""
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed (make system installs Debian's package)")
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--storage.tsdb.path={workdir / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited {proc.returncode}:\n{(workdir / 'prometheus.log').read_text()[-3000:]}")
            try:
                if http_get(url + "/-/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus not ready in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def prometheus_api(url: str, path: str) -> dict:
    status, body = http_get(url + path)
    assert status == 200, body[:500]
    return json.loads(body)["data"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def build_context_files(context: Path) -> set[str]:
    """Files that `docker build` sends for `context`, after its .dockerignore, computed by docker-py's own
    implementation (the library Debian's docker-compose is built on; it runs under the system Python)."""
    script = ("import json, sys; from docker.utils.build import exclude_paths; "
              "root = sys.argv[1]; ign = root + '/.dockerignore'; import os; "
              "pats = [l.strip() for l in open(ign) if l.strip() and not l.startswith('#')] if os.path.exists(ign) else []; "
              "print(json.dumps(sorted(exclude_paths(root, pats))))")
    res = subprocess.run(["/usr/bin/python3", "-c", script, str(context)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout))
