"""docker-compose.yml and the two Dockerfiles, checked without a Docker engine (none runs here).

The compose file goes through a real parser (Debian's docker-compose 1.29 `config`, and the docker CLI's
`compose` plugin where installed); every test reads what the parser understood, not the raw YAML. Then
every build context, Dockerfile, COPY source, mounted path, port and healthcheck endpoint is checked
against the code and configs it names: the gateway's settings and FastAPI route table, the Prometheus
configs (with a real Prometheus answering the healthcheck path), the Grafana provisioning files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy_support import (PROMTOOL, ROOT, build_context_files, dockerfile_instructions, http_get, load_yaml_docs,
                      running_prometheus)

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_COMPOSE = shutil.which("docker-compose")


def compose_config(compose_file: Path, **env: str) -> subprocess.CompletedProcess:
    env = {"DBP_GATEWAY_API_KEY": "", "DBP_GATEWAY_SEED_SECRET": "", "DBP_GATEWAY_ALLOW_CLIENT_SEED": "", **env}
    return subprocess.run([DOCKER_COMPOSE, "-f", str(compose_file), "config"], capture_output=True, text=True,
                          timeout=120, cwd=compose_file.parent, env={**os.environ, **env})


@pytest.fixture(scope="module")
def compose() -> dict:
    if DOCKER_COMPOSE is None:
        pytest.fail("docker-compose is not installed (make system installs Debian's package)")
    res = compose_config(COMPOSE_FILE)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def container_path_to_host(service: dict, container_path: str) -> Path:
    """The host path a bind mount of `service` maps `container_path` to (the deepest mount wins, as in the
    container)."""
    best = None
    for v in service.get("volumes", []):
        target = v["target"] if isinstance(v, dict) else v.split(":")[1]
        source = v["source"] if isinstance(v, dict) else v.split(":")[0]
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > len(best[0]):
                best = (target, source)
    assert best is not None, f"{container_path} is not under any mount of the service"
    assert best[1].startswith("/"), f"{container_path} lies in the named volume {best[1]}, not a bind mount"
    return Path(best[1]) / os.path.relpath(container_path, best[0])


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            if v.get("type") == "bind":
                out.append((Path(v["source"]), v["target"]))
        else:
            src, target = v.split(":")[:2]
            if src.startswith("/"):
                out.append((Path(src), target))
    return out


def healthcheck_url(service: dict) -> str:
    test = service["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else test
    m = re.search(r"(?:https?://)?(?:localhost|127\.0\.0\.1):(\d+)(/[\w/\-.]*)", text)
    assert m, f"no local URL in healthcheck {text!r}"
    return f"http://127.0.0.1:{m.group(1)}{m.group(2)}"


def published(service: dict) -> dict[int, int]:
    """container port -> host port"""
    out = {}
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out[int(p["target"])] = int(p["published"])
        else:
            host, _, cont = str(p).rpartition(":")
            out[int(cont)] = int(host)
    return out


# ---- the parser ---------------------------------------------------------------------------------------

def test_compose_parser_rejects_a_broken_file(tmp_path):
    """The parser validates against the compose schema, so the passing parse above means something."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("shm_size:", "shm_sise:", 1))
    res = compose_config(bad)
    assert res.returncode != 0 and "shm_sise" in res.stderr


def test_docker_compose_v2_plugin_parses_too():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker CLI's compose plugin is not installed here (docker-compose 1.29 parsed the file)")
    res = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr


def test_services_healthchecks_and_start_order(services):
    assert set(services) == {"triton", "gateway", "prometheus", "grafana"}
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services and cond == {"condition": "service_healthy"}, (name, dep, cond)
    assert set(services["gateway"]["depends_on"]) == {"triton"}
    assert {"triton", "gateway"} <= set(services["prometheus"]["depends_on"])
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}


def test_triton_gpu_reservation_and_shm(services):
    triton = services["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    size = str(triton["shm_size"]).lower()
    value, unit = re.fullmatch(r"(\d+)([kmg]?)b?", size).groups()
    assert int(value) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit] >= 1 << 30, "shm below 1 GiB"


# ---- files ------------------------------------------------------------------------------------------

def test_build_contexts_dockerfiles_and_mounts_exist(services):
    for name, svc in services.items():
        if "build" in svc:
            ctx = Path(svc["build"]["context"])
            assert ctx.is_dir(), (name, ctx)
            assert (ctx / svc["build"].get("dockerfile", "Dockerfile")).is_file(), name
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]) and not svc["image"].endswith(":latest"), \
                f"{name}: pin the image tag"
        for src, target in bind_mounts(svc):
            assert src.exists(), f"{name}: mounted {src} -> {target} does not exist"
            assert ROOT in src.parents, f"{name}: {src} is outside the repository"


@pytest.mark.parametrize("service", ["triton", "gateway"])
def test_dockerfile_copy_sources_reach_the_build_context(services, service):
    build = services[service]["build"]
    ctx = Path(build["context"])
    dockerfile = ctx / build["dockerfile"]
    sent = build_context_files(ctx)
    instructions = dockerfile_instructions(dockerfile)
    assert instructions[0][0] in ("FROM", "ARG")
    copies = [args for instr, args in instructions if instr in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            src = src.rstrip("/")
            assert (ctx / src).exists(), f"{dockerfile.name}: COPY source {src} does not exist"
            if (ctx / src).is_file():
                assert src in sent, f"COPY {src}: excluded by .dockerignore"
            else:  # every tracked file of a copied directory is sent, none of it ignored
                tracked = subprocess.run(["git", "ls-files", src], cwd=ctx, capture_output=True, text=True).stdout.split()
                missing = [f for f in tracked if f not in sent]
                assert not missing, f"COPY {src}: .dockerignore drops {missing[:5]}"
    assert any(i == "HEALTHCHECK" for i, _ in instructions), f"{dockerfile}: no HEALTHCHECK"


def test_gateway_image_is_slim_non_root_and_torch_free(services, gateway_paths):
    dockerfile = ROOT / services["gateway"]["build"]["dockerfile"]
    instructions = dockerfile_instructions(dockerfile)
    base = instructions[0][1]
    assert "slim" in base or "alpine" in base or "distroless" in base, base
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the gateway must not run as root"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "numeric USER, so Kubernetes' runAsNonRoot can verify it"
    # only the gateway's own files go in: nothing of dbp/, training/, model weights
    for i, args in instructions:
        if i in ("COPY", "ADD"):
            for src in [p for p in args.split() if not p.startswith("--")][:-1]:
                assert src.startswith("service/"), f"the gateway image copies {src}"
    reqs = (ROOT / "service" / "requirements.txt").read_text().lower()
    names = {re.split(r"[=<>\[; ]", line.strip())[0] for line in reqs.splitlines() if line.strip() and not line.startswith("#")}
    assert not names & {"torch", "dbp", "diffusers", "torchvision"}, names
    assert "tritonclient" in names and "fastapi" in names
    # the image's healthcheck hits a route the gateway serves
    hc = next(a for i, a in instructions if i == "HEALTHCHECK")
    path = re.search(r"/(livez|readyz)\b", hc).group(0)
    assert path in gateway_paths


IMPORT_PROBE = """
import json, sys
from service.app.core.config import Settings
from service.app.main import create_app
import service.__main__
create_app(Settings())
print(json.dumps({"file": sys.modules["service"].__file__, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def requirement_closure(requirements: Path) -> set[str]:
    """Normalised names of the distributions a requirements file installs, dependencies included (from the
    installed metadata, extras and markers evaluated)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [Requirement(line.split("#")[0].strip()) for line in requirements.read_text().splitlines()
            if line.split("#")[0].strip()]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for dep in md.requires(req.name) or []:
            d = Requirement(dep)
            if d.marker is None or any(d.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(d)
    return seen


def test_gateway_runs_from_the_image_files_alone(services, tmp_path):
    """Replay the gateway Dockerfile's COPY lines (after .dockerignore) into an empty directory and start the
    app from there: it needs nothing else of the repository, imports no torch/dbp, and every third-party
    module it imports comes from a distribution that service/requirements.txt installs."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    build = services["gateway"]["build"]
    ctx = Path(build["context"])
    instructions = dockerfile_instructions(ctx / build["dockerfile"])
    sent = build_context_files(ctx)
    workdir = next(a for i, a in instructions if i == "WORKDIR")
    image = tmp_path / "image"
    for i, args in instructions:
        if i != "COPY":
            continue
        *srcs, dst = [p for p in args.split() if not p.startswith("--")]
        dst_path = image / workdir.lstrip("/") / dst
        for src in srcs:
            src = src.rstrip("/")
            for f in sorted(sent):
                if f == src or f.startswith(src + "/"):
                    if (ctx / f).is_file():
                        target = dst_path / os.path.relpath(f, src) if f != src or dst.endswith("/") else dst_path
                        if f == src and dst.endswith("/"):
                            target = dst_path / Path(f).name
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(ctx / f, target)
    app_dir = image / workdir.lstrip("/")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBP_GATEWAY_") and k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", IMPORT_PROBE], cwd=app_dir, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    assert probe["file"].startswith(str(app_dir)), "the probe imported the repository's service/, not the copy"
    modules = set(probe["modules"])
    assert not modules & {"torch", "dbp", "diffusers", "training"}, modules & {"torch", "dbp", "diffusers"}
    third_party = {m for m in modules if m not in sys.stdlib_module_names and not m.startswith("_")
                   and m != "service"}
    installed = requirement_closure(app_dir / "service" / "requirements.txt")
    dists = packages_distributions()
    missing = {m: dists.get(m) for m in third_party
               if m in dists and not {canonicalize_name(d) for d in dists[m]} & installed}
    assert not missing, f"imported but not installed by service/requirements.txt: {missing}"


def test_triton_image_serves_the_mounted_repository(services):
    triton = services["triton"]
    instructions = dockerfile_instructions(ROOT / triton["build"]["dockerfile"])
    cmd = json.loads(next(a for i, a in instructions if i == "CMD"))
    repo = next(a.split("=", 1)[1] for a in cmd if a.startswith("--model-repository="))
    host_repo = container_path_to_host(triton, repo)
    assert host_repo == ROOT / "model_repository"
    assert sorted(p.parent.name for p in host_repo.glob("*/config.pbtxt")) == ["certify", "classifier", "purifier",
                                                                          "purify_classify"]
    # certify is optional until its weights are copied in: the entrypoint then hands Triton a view without it
    entrypoint = (ROOT / "deploy" / "triton" / "entrypoint.sh").read_text()
    assert 'certify/[0-9]*/weights' in entrypoint and "--model-repository=$view" in entrypoint
    copied = [a.split() for i, a in instructions if i == "COPY"]
    assert ["requirements-serving.txt", "."] in copied, "the image installs the models' own requirements"
    reqs = (ROOT / "requirements-serving.txt").read_text()
    assert re.search(r"^numpy==1\.", reqs, re.M), "numpy<2 for the python backend (docs: triton-on-cpu.md)"


# ---- ports and endpoints -----------------------------------------------------------------------------

def test_gateway_settings_ports_and_routes(services, gateway_paths, monkeypatch):
    """The compose environment passes the gateway's own settings validation and agrees with the ports."""
    from service.app.core.config import ENV_PREFIX, Settings

    gw = services["gateway"]
    env = {k: v for k, v in gw["environment"].items() if k.startswith(ENV_PREFIX)}
    for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k == ENV_PREFIX + "MODEL_REPOSITORY":  # a container path: check the host directory it maps to
            v = str(container_path_to_host(gw, v))
        monkeypatch.setenv(k, "" if v is None else str(v))
    settings = Settings()
    assert settings.PORT == Settings.model_fields["PORT"].default, "compose and the settings default agree"
    assert settings.HOST == "0.0.0.0"
    assert list(published(gw)) == [settings.PORT]
    hc = healthcheck_url(gw)
    assert hc.endswith(f":{settings.PORT}/readyz") and "/readyz" in gateway_paths and "/livez" in gateway_paths
    # every Triton URL names the triton service's gRPC port
    triton_ports = published(services["triton"])
    for url in settings.TRITON_URLS:
        host, port = url.rsplit(":", 1)
        assert host == "triton" and int(port) in triton_ports and int(port) == 8001


def test_gateway_seed_settings_come_from_the_shell(monkeypatch):
    """The seed secret and the client-seed switch pass from the shell (or .env) to every gateway container,
    and what arrives passes the gateway's own validation."""
    from service.app.core.config import ENV_PREFIX, Settings

    if DOCKER_COMPOSE is None:
        pytest.fail("docker-compose is not installed (make system installs Debian's package)")
    secret = "0123456789abcdef" * 4
    res = compose_config(COMPOSE_FILE, DBP_GATEWAY_SEED_SECRET=secret, DBP_GATEWAY_ALLOW_CLIENT_SEED="false")
    assert res.returncode == 0, res.stderr
    env = yaml.safe_load(res.stdout)["services"]["gateway"]["environment"]
    assert env[ENV_PREFIX + "SEED_SECRET"] == secret and env[ENV_PREFIX + "ALLOW_CLIENT_SEED"] == "false"
    for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(k)
    for k in ("SEED_SECRET", "ALLOW_CLIENT_SEED"):
        monkeypatch.setenv(ENV_PREFIX + k, env[ENV_PREFIX + k])
    settings = Settings()
    assert settings.SEED_SECRET.get_secret_value() == secret and settings.ALLOW_CLIENT_SEED is False


def test_triton_ports_and_health_endpoint(services):
    triton = services["triton"]
    # tritonserver defaults (the image's CMD does not override them): 8000 HTTP, 8001 gRPC, 8002 metrics
    assert set(published(triton)) == {8000, 8001, 8002}
    assert healthcheck_url(triton) == "http://127.0.0.1:8000/v2/health/ready"
    # (a real tritonserver answering these paths: tests/deploy/test_triton_balancing.py)


def test_prometheus_config_rules_and_targets(services, tmp_path):
    prom = services["prometheus"]
    cfg_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    cfg_host = container_path_to_host(prom, cfg_arg.split("=", 1)[1])
    cfg = yaml.safe_load(cfg_host.read_text())
    # same job names as monitoring/prometheus.yml: the alert rules and the dashboard select on them
    reference = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert [j["job_name"] for j in cfg["scrape_configs"]] == [j["job_name"] for j in reference["scrape_configs"]]
    # targets: the compose services on the ports they listen on
    gw_port = int(services["gateway"]["environment"]["DBP_GATEWAY_PORT"])
    targets = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in cfg["scrape_configs"]}
    assert targets["dbp-gateway"] == [f"gateway:{gw_port}"]
    assert targets["triton"] == ["triton:8002"]
    # and the same ports as the local stack's config (`make up`: gateway and Triton on loopback)
    ref_ports = {j["job_name"]: [t.rsplit(":", 1)[1] for sc in j["static_configs"] for t in sc["targets"]]
                 for j in reference["scrape_configs"]}
    assert ref_ports == {job: [t.rsplit(":", 1)[1] for t in ts] for job, ts in targets.items()}
    # the rule files the config names are the ones mounted, i.e. all of monitoring/rules/*.rules.yml
    rule_globs = [container_path_to_host(prom, g) for g in cfg["rule_files"]]
    matched = sorted(p for g in rule_globs for p in g.parent.glob(g.name))
    assert matched == sorted((ROOT / "monitoring" / "rules").glob("*.rules.yml")) and matched
    # promtool parses config + rules for real (rule paths rewritten to the host's)
    local = dict(cfg, rule_files=[str(g) for g in rule_globs])
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))
    res = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_healthcheck_path_answers_on_a_real_prometheus(services, tmp_path):
    prom = services["prometheus"]
    hc = healthcheck_url(prom)
    assert hc.startswith("http://127.0.0.1:9090/") and 9090 in published(prom)
    cfg = yaml.safe_load(container_path_to_host(prom, "/etc/prometheus/prometheus.yml").read_text())
    cfg["rule_files"] = [str(container_path_to_host(prom, g)) for g in cfg["rule_files"]]
    (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
    with running_prometheus(tmp_path / "p.yml", tmp_path) as url:
        status, body = http_get(url + hc.split(":9090", 1)[1])
        assert status == 200, body
        # and it loaded every alerting/recording rule group of the mounted rule files
        groups = json.loads(http_get(url + "/api/v1/rules")[1])["data"]["groups"]
        expected = {g["name"] for f in (ROOT / "monitoring" / "rules").glob("*.rules.yml")
                    for g in yaml.safe_load(f.read_text())["groups"]}
        assert {g["name"] for g in groups} == expected


def test_grafana_provisioning_mounts(services):
    graf = services["grafana"]
    assert healthcheck_url(graf) == "http://127.0.0.1:3000/api/health" and 3000 in published(graf)
    monitoring = ROOT / "monitoring" / "grafana" / "provisioning"
    assert container_path_to_host(graf, "/etc/grafana/provisioning/dashboards") == monitoring / "dashboards"
    # datasources: monitoring's, with the URL of the compose service (in the grafana container 127.0.0.1 is
    # grafana itself); every other field equal, the dashboard refers to the datasource by uid
    ds_dir = container_path_to_host(graf, "/etc/grafana/provisioning/datasources")

    def datasources(folder: Path) -> list[dict]:
        return [d for f in sorted(folder.glob("*.y*ml")) for doc in load_yaml_docs(f) for d in doc.get("datasources", [])]

    ours, theirs = datasources(ds_dir), datasources(monitoring / "datasources")
    assert [d["url"].rstrip("/") for d in ours if d["type"] == "prometheus"] == ["http://prometheus:9090"]
    strip = lambda ds: [{k: v for k, v in d.items() if k != "url"} for d in ds]  # noqa: E731
    assert strip(ours) == strip(theirs)
    # dashboards: every file provider's path is a mounted directory that holds the committed dashboards,
    # each naming a datasource uid that is provisioned
    providers = [p for f in sorted((monitoring / "dashboards").glob("*.y*ml")) for doc in load_yaml_docs(f)
                 for p in doc.get("providers", [])]
    assert providers
    uids = {d["uid"] for d in ours}
    for p in providers:
        host = container_path_to_host(graf, p["options"]["path"])
        assert host == ROOT / "monitoring" / "grafana" / "dashboards"
        dashboards = list(host.glob("*.json"))
        assert dashboards, f"no dashboard JSON in {host}"
        for d in dashboards:
            text = d.read_text()
            assert json.loads(text).get("panels"), d
            used = set(re.findall(r'"uid":\s*"([^"]+)"', text)) & ({"dbp-prometheus"} | uids)
            assert used and used <= uids, f"{d.name} uses datasource uids {used}, provisioned {uids}"
