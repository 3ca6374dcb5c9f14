"""Run the real Triton Inference Server (from the nvidia-pytriton wheel) on a CPU machine.

  dbp-triton --repo model_repository              # foreground, Ctrl-C stops it (= python -m dbp.serving.launcher)
  dbp-triton --repo model_repository --http-port 8000 --grpc-port 8001 --metrics-port 8002

  h, g, m = free_ports(3)
  with TritonServer(ServerConfig(repo="model_repository", http_port=h, grpc_port=g, metrics_port=m)) as srv:
      srv.http_url, srv.grpc_url

Follows docs/triton-on-cpu.md: the python backend dir is assembled with the stub built for this
interpreter; LD_LIBRARY_PATH holds the wheel's vendored libs and this Python's LIBDIR (the stub must embed
the same libpython as the venv's stdlib); PATH starts with the venv's bin so the embedded Python finds the
venv. If the stub cannot start, tritonserver hangs in "loading" forever, so readiness has a hard deadline
and a pid check. Each server gets its own python-backend shm prefix, so stale regions can be told apart
from those of a live server started by someone else (another test, `make up`). A watchdog process
(dbp.serving.watchdog) kills the server's stubs and removes its regions when the server dies, however it dies.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .. import repository
from . import watchdog
from .watchdog import SHM_DIR, SHM_PREFIX

# A test session (tests/leak_check.py) puts a few hex digits here so that the regions of its servers, and
# only those, can be found at its end among the regions of other servers on the same machine.
SHM_TAG_ENV = "DBP_TRITON_SHM_TAG"
_SHM_RE = re.compile(re.escape(SHM_PREFIX) + r"([0-9a-f]{12})_")
CONTROL_MODES = ("none", "poll", "explicit")


class TritonServerError(RuntimeError):
    """The server could not be started or died; the message carries the tail of its log."""


@dataclass
class ServerConfig:
    repo: str = "model_repository"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "poll"  # poll picks up a new version dir by itself; explicit needs load calls
    poll_secs: int = 1
    load_models: Sequence[str] = ()  # explicit mode: models loaded at start-up ("*" = all)
    ready_timeout: float = 180.0
    # On SIGTERM tritonserver waits up to exit_timeout_secs for open HTTP connections, in-flight requests and
    # the python stubs to finish (a torch stub can take >10 s to unload on a busy 2-core machine), then exits 1.
    exit_timeout_secs: int = 30
    stop_timeout: float = 60.0  # after this, SIGKILL
    shm_default_bytes: int = 4 << 20  # image batches with votes outgrow the 1 MiB default at once
    shm_growth_bytes: int = 4 << 20
    log_verbose: int = 0
    run_dir: Optional[str] = None  # backend dir + log; a temp dir (removed on stop) when None
    echo: bool = False  # copy the server log to stderr as it comes (foreground CLI)
    extra_args: Sequence[str] = field(default_factory=tuple)


def free_ports(n: int = 3, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):  # hold all sockets open at once so the n ports differ
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- environment ---------------------------------------------------------------------------------

def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def triton_root() -> Path:
    root = _site_packages() / "pytriton" / "tritonserver"
    if not (root / "bin" / "tritonserver").exists():
        raise TritonServerError(f"no tritonserver binary under {root}: install nvidia-pytriton==0.7.0 in this venv")
    return root


def check_environment() -> None:
    """The failure modes of triton-on-cpu.md §3 that would otherwise corrupt tensors or hang silently."""
    import numpy as np
    if int(np.__version__.split(".")[0]) >= 2:
        raise TritonServerError(f"numpy {np.__version__} in the stub environment silently corrupts tensors; "
                                "Triton's python backend needs numpy<2")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise TritonServerError(f"{sys.executable} is not a shared-library Python build; the python backend stub "
                                "needs the matching libpython3.X.so.1.0")
    libdir = Path(sysconfig.get_config_var("LIBDIR"))
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not (libdir / f"libpython{ver}.so.1.0").exists():
        raise TritonServerError(f"libpython{ver}.so.1.0 not found in {libdir} (this Python's LIBDIR)")


def server_env(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    libs = [str(_site_packages() / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
    return env


def assemble_backends(run_dir: Path) -> Path:
    """<run_dir>/backends/python = the wheel's backend + the stub for this interpreter's version."""
    root = triton_root()
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonServerError(f"the wheel has no python backend stub for Python {ver} ({stub})")
    dst = run_dir / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (root / "backends" / "python" / "libtriton_python.so",
              root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(f, dst / f.name)
    return run_dir / "backends"


def check_repository(repo: Path) -> list[str]:
    """Fail before launching when a python model has no version (tritonserver's error is vaguer), and give
    every version's model.py its .pyc (a version dir from git has none; see dbp.repository.ensure_bytecode).
    Returns the optional models (dbp.repository.OPTIONAL_MODELS: certify) that no version with weights backs yet;
    the server is started without them (repository_view)."""
    if not repo.is_dir():
        raise TritonServerError(f"model repository {repo} does not exist")
    skipped = repository.unservable_optional_models(repo)
    for cfg in sorted(repo.glob("*/config.pbtxt")):
        if 'backend: "python"' not in cfg.read_text() or cfg.parent.name in skipped:
            continue
        versions = [d for d in (cfg.parent / str(v) for v in repository.versions(cfg.parent))
                    if (d / repository.MODEL_FILE).exists()]
        for d in versions:
            repository.ensure_bytecode(d / repository.MODEL_FILE)
        if not versions:
            raise TritonServerError(
                f"{cfg.parent} has no version directory with a model.py; export one first:\n"
                "  python -m training.export --purifier <diffusion ckpt dir> --classifier <classifier ckpt dir> "
                f"--card <card.json> --repo {repo}")
    return skipped


def repository_view(repo: Path, skipped: Sequence[str], run_dir: Path) -> Path:
    """`repo` as Triton sees it without the `skipped` models: a directory of symlinks to every other top-level
    entry (model dirs, legacy.json), so polling still sees new versions of the served models. Triton has no
    option to leave a model directory out, and one that cannot load stops its start."""
    if not skipped:
        return repo
    view = run_dir / "repository"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for entry in sorted(repo.iterdir()):
        if entry.name not in skipped:
            (view / entry.name).symlink_to(entry.resolve())
    return view


# ---- shared-memory regions -----------------------------------------------------------------------

def _live_cmdlines() -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out.append((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


def remove_stale_shm_regions(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove our regions whose server is gone.

    A region is ours if it carries SHM_PREFIX + a 12-hex token; it is live while any process (the server,
    whose --backend-config names the prefix, or a stub, whose argv names the region) mentions the token.
    Regions of other Triton servers (stock prefix) are never touched.
    """
    tokens = {m.group(1): f for f in shm_dir.glob(SHM_PREFIX + "*") if (m := _SHM_RE.match(f.name))}
    if not tokens:
        return []
    cmdlines = "\n".join(_live_cmdlines())
    removed = []
    for tok, f in tokens.items():
        if SHM_PREFIX + tok not in cmdlines:
            for g in shm_dir.glob(f"{SHM_PREFIX}{tok}_*"):
                try:
                    g.unlink()
                    removed.append(g)
                except FileNotFoundError:
                    pass
    return removed


# ---- the server ----------------------------------------------------------------------------------

def _new_token() -> str:
    tag = os.environ.get(SHM_TAG_ENV, "")
    if not re.fullmatch(r"[0-9a-f]{0,8}", tag):
        tag = ""
    return tag + secrets.token_hex(6)[len(tag):]


def _die_with_parent() -> None:
    # If the launching process is SIGKILLed (a killed pytest, a crashed CLI), do not leave a server behind.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonServer:
    """A tritonserver subprocess; start() returns once /v2/health/ready answers 200."""

    def __init__(self, config: ServerConfig):
        if config.model_control_mode not in CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {CONTROL_MODES}, got {config.model_control_mode!r}")
        self.config = config
        self.repo = Path(config.repo).resolve()
        self.served_repo = self.repo  # what Triton is given: a view without unservable optional models (start)
        self.skipped: list[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self.token = _new_token()
        self.startup_s: Optional[float] = None
        self._own_run_dir = config.run_dir is None
        self.run_dir = Path(config.run_dir) if config.run_dir else None
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: Optional[threading.Thread] = None
        self.log_path: Optional[Path] = None
        self._server_start: Optional[int] = None  # /proc start time of tritonserver: tells it from a reused pid
        self.watchdog: Optional[subprocess.Popen] = None

    # urls ---------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    @property
    def shm_prefix(self) -> str:
        return watchdog.shm_prefix(self.token)

    def command(self, backends: Path) -> list[str]:
        c = self.config
        cmd = [str(triton_root() / "bin" / "tritonserver"),
               f"--model-repository={self.served_repo}", f"--backend-directory={backends}",
               f"--http-address={c.host}", f"--grpc-address={c.host}", f"--metrics-address={c.host}",
               f"--http-port={c.http_port}", f"--grpc-port={c.grpc_port}", f"--metrics-port={c.metrics_port}",
               "--disable-auto-complete-config",
               f"--model-control-mode={c.model_control_mode}",
               f"--exit-timeout-secs={c.exit_timeout_secs}",
               f"--log-verbose={c.log_verbose}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--backend-config=python,shm-default-byte-size={c.shm_default_bytes}",
               f"--backend-config=python,shm-growth-byte-size={c.shm_growth_bytes}"]
        if c.model_control_mode == "poll":
            cmd.append(f"--repository-poll-secs={c.poll_secs}")
        if c.model_control_mode == "explicit":
            cmd += [f"--load-model={m}" for m in c.load_models]
        return cmd + list(c.extra_args)

    def log_tail(self, n: int = 60) -> str:
        return "".join(list(self._tail)[-n:])

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for line in iter(self.proc.stdout.readline, ""):
                self._tail.append(line)
                log.write(line)
                log.flush()
                if self.config.echo:
                    sys.stderr.write(line)

    def start(self) -> "TritonServer":
        if self.proc is not None:
            raise TritonServerError("server already started")
        check_environment()
        self.skipped = check_repository(self.repo)
        remove_stale_shm_regions()
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="dbp-triton-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.served_repo = repository_view(self.repo, self.skipped, self.run_dir)
        for m in self.skipped:
            print(f"note: not serving {self.repo / m}: no version with {repository.WEIGHTS_DIR}/ yet "
                  f"(docs/certify.md, Serving)", file=sys.stderr, flush=True)
        backends = assemble_backends(self.run_dir)
        self.log_path = self.run_dir / "tritonserver.log"
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(backends), env=server_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        # read before anything can reap the child, so the pid still names this server
        self._server_start = watchdog.start_time(self.proc.pid)
        try:
            (self.run_dir / "tritonserver.pid").write_text(f"{self.proc.pid}\n")
            self._start_watchdog()
            self._reader = threading.Thread(target=self._pump, name="tritonserver-log", daemon=True)
            self._reader.start()
            self._wait_ready(t0 + self.config.ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _start_watchdog(self) -> None:
        """The process that kills this server's stubs and removes its regions once the server is gone, also
        when this process was SIGKILLed and nobody calls stop(). A session of its own, so that signals to this
        process's group (Ctrl-C, a test runner killing its group) spare it."""
        with open(self.run_dir / "watchdog.log", "ab") as log:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-S", "-E", watchdog.__file__, str(self.proc.pid), str(self._server_start or 0),
                 str(os.getpid()), self.token, str(self.config.stop_timeout)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_ready(self, deadline: float) -> None:
        url = f"http://{self.config.host}:{self.config.http_port}/v2/health/ready"
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._reader.join(timeout=5)
                raise TritonServerError(f"tritonserver exited with code {rc} before becoming ready; "
                                        f"log tail ({self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonServerError(f"tritonserver not ready after {self.config.ready_timeout:.0f} s (a python "
                                        f"stub that cannot start makes it hang); log tail ({self.log_path}):\n"
                                        f"{self.log_tail()}")
            time.sleep(0.2)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> Optional[int]:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL after stop_timeout; returns the exit code."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(self.config.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: takes the stubs with it
                rc = self.proc.wait()
        # The stubs of a killed server may still run (they ignore SIGTERM and can hang on their way out), so
        # whatever is left goes now, not only when the watchdog gets to it; they hold the log pipe open too,
        # hence before joining the reader.
        watchdog.cleanup(self.proc.pid, self._server_start or 0, self.shm_prefix)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.watchdog is not None:
            try:  # it sees the server gone within a poll and exits
                self.watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
            self.watchdog = None
        if self._own_run_dir and self.run_dir is not None and rc == 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # keep the log of a failed run
        self.proc = None
        return rc

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- CLI -----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dbp-triton",
                                description="Serve model_repository/ with Triton on CPU until Ctrl-C.")
    d = ServerConfig()
    p.add_argument("--repo", default=d.repo, help="Triton model repository")
    p.add_argument("--host", default=d.host, help="address to bind (loopback by default)")
    p.add_argument("--http-port", type=int, default=d.http_port)
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--model-control-mode", choices=CONTROL_MODES, default=d.model_control_mode,
                   help="poll: new version dirs are loaded by themselves (default)")
    p.add_argument("--poll-secs", type=int, default=d.poll_secs)
    p.add_argument("--load-model", action="append", default=[], help="explicit mode: model to load at start")
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout)
    p.add_argument("--log-verbose", type=int, default=d.log_verbose)
    p.add_argument("--run-dir", default=None, help="where the backend dir and tritonserver.log go")
    p.add_argument("--quiet", action="store_true", help="do not echo the server log")
    a = p.parse_args(argv)
    cfg = ServerConfig(repo=a.repo, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port,
                       metrics_port=a.metrics_port, model_control_mode=a.model_control_mode, poll_secs=a.poll_secs,
                       load_models=a.load_model, ready_timeout=a.ready_timeout, log_verbose=a.log_verbose,
                       run_dir=a.run_dir, echo=not a.quiet)
    server = TritonServer(cfg)
    try:
        server.start()  # Ctrl-C here raises KeyboardInterrupt; start() stops the half-started server
    except TritonServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"Triton ready in {server.startup_s:.1f} s: http {server.http_url}  grpc {server.grpc_url}  "
          f"metrics {server.metrics_url}  (Ctrl-C stops)", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        if not server.is_alive():
            rc = server.proc.poll()
            print(f"error: tritonserver died with code {rc}; log tail:\n{server.log_tail()}", file=sys.stderr)
            server.stop()
            return 1
    rc = server.stop()
    print(f"tritonserver stopped (exit code {rc})", file=sys.stderr)
    if rc != 0 and "HTTP service connections" in server.log_tail(400):
        print("note: a client kept an HTTP connection open, so tritonserver spent its whole --exit-timeout-secs "
              "waiting for it and then exited 1; close clients (tritonclient .close()) before stopping",
              file=sys.stderr)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
