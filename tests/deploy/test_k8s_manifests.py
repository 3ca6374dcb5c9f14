"""deploy/k8s: the kustomize tree rendered by `kubectl kustomize` (Kustomize v5) and every object validated
offline against the Kubernetes OpenAPI schemas (PyPI kubernetes-validate, strict: unknown fields fail).
No cluster runs here: beyond the schemas, the tests check that the pieces agree with each other and with the
code they run (gateway settings and routes, Triton's ports, the metric names, the Prometheus config as a real
Prometheus applies it to the pods these manifests describe, the adapter's queries as promtool parses them).
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from deploy_support import PROMTOOL, ROOT, http_get, running_prometheus

K8S = ROOT / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl")
# the oldest and the newest Kubernetes release the manifests are checked against
K8S_VERSIONS = ("1.30.0", "1.37.0")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService"}

kubernetes_validate = pytest.importorskip("kubernetes_validate")


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    """The tree as kustomize renders it: kubectl's Kustomize v5 (these machines have kubectl 1.32 with v5.5).
    No home-made renderer: a machine without it skips, saying why. Debian's kubernetes-client (kubectl 1.20,
    Kustomize v2) cannot render this tree (no --load-restrictor, no `labels` field), so make cannot install it."""
    if KUBECTL is None:
        pytest.skip("needs kubectl with Kustomize v5 (kubectl >= 1.27); Debian's kubernetes-client 1.20 is too old")
    version = subprocess.run([KUBECTL, "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"Kustomize Version: v(\d+)", version)
    if not m or int(m.group(1)) < 5:
        pytest.skip(f"needs kubectl with Kustomize v5, {KUBECTL} has: {version.strip()!r}")
    res = subprocess.run([KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(K8S)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def get(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj.get("spec", {}).get("template", {}).get("spec", {})


def container(obj: dict, name: str) -> dict:
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


# ---- the tree and the schemas -----------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    k = kustomization()
    generated = {(K8S / f).resolve() for g in k["configMapGenerator"] for f in g["files"]}
    listed = {(K8S / f).resolve() for f in k["resources"]} | generated
    on_disk = {p.resolve() for p in K8S.rglob("*.y*ml") if p.name != "kustomization.yaml"}
    assert on_disk - listed == set(), "manifests that kustomize would not apply"
    assert {p for p in listed if not p.exists()} == set()
    # the Prometheus rules come from monitoring/, their one copy, all of them
    rules = next(g for g in k["configMapGenerator"] if g["name"] == "prometheus-rules")
    assert sorted((K8S / f).resolve() for f in rules["files"]) == sorted((ROOT / "monitoring" / "rules").glob("*.rules.yml"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(objects, version):
    assert len(objects) >= 20
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_rejects_a_misspelt_field(objects):
    bad = copy.deepcopy(get(objects, "StatefulSet", "triton"))
    c = container(bad, "triton")
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_namespaced_objects_name_their_namespace(objects):
    for o in objects:
        ns = o["metadata"].get("namespace")
        if o["kind"] in CLUSTER_SCOPED:
            assert ns is None, o["metadata"]["name"]
        else:
            # kube-system only for the binding that lets the adapter read the apiserver's auth config
            assert ns == "dbp" or (ns == "kube-system" and o["kind"] == "RoleBinding"), (o["kind"], o["metadata"])


# ---- Triton -----------------------------------------------------------------------------------------------

def test_triton_gpu_shm_probes_and_headless_service(objects):
    sts = get(objects, "StatefulSet", "triton")
    c = container(sts, "triton")
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, "GPUs are requested through limits"
    shm = next(v for v in pod_spec(sts)["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
    assert {"name": shm["name"], "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # tritonserver's default ports (the args do not override them)
    assert not any(a.startswith(("--http-port", "--grpc-port", "--metrics-port")) for a in c["args"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert port_number(c, c["readinessProbe"]["httpGet"]["port"]) == 8000
    assert port_number(c, c["livenessProbe"]["httpGet"]["port"]) == 8000
    # the models baked into the image at /models (deploy/triton/Dockerfile) are the ones served
    assert "--model-repository=/models" in c["args"]
    assert "COPY model_repository/ /models/" in (ROOT / "deploy" / "triton" / "Dockerfile").read_text()
    svc = get(objects, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None", "headless: one DNS name per pod, no virtual IP"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for p in svc["spec"]["ports"]:
        assert port_number(c, p["targetPort"]) == p["port"]


# ---- the gateway ------------------------------------------------------------------------------------------

def test_gateway_probes_settings_and_triton_addresses(objects, gateway_paths, monkeypatch):
    from service.app.core.config import ENV_PREFIX, Settings

    dep = get(objects, "Deployment", "gateway")
    c = container(dep, "gateway")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and "/readyz" in gateway_paths
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and "/livez" in gateway_paths
    # the environment passes the gateway's own settings validation
    for k in [k for k in __import__("os").environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(k)
    for e in c["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    settings = Settings()
    assert port_number(c, c["readinessProbe"]["httpGet"]["port"]) == settings.PORT
    assert port_number(c, "http") == settings.PORT and settings.HOST == "0.0.0.0"
    svc = get(objects, "Service", "gateway")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert port_number(c, svc["spec"]["ports"][0]["targetPort"]) == settings.PORT
    # Triton addresses: each StatefulSet pod's stable name under the headless Service, gRPC port, for every
    # replica the Triton HPA may create; names of pods not running do not resolve and the gateway skips them
    sts = get(objects, "StatefulSet", "triton")
    tsvc = get(objects, "Service", sts["spec"]["serviceName"])
    grpc = next(p["port"] for p in tsvc["spec"]["ports"] if p["name"] == "grpc")
    hpa = next(h for h in objects if h["kind"] == "HorizontalPodAutoscaler"
               and h["spec"]["scaleTargetRef"]["name"] == "triton")
    ns = sts["metadata"]["namespace"]
    expected = [f"{sts['metadata']['name']}-{i}.{tsvc['metadata']['name']}.{ns}.svc.cluster.local:{grpc}"
                for i in range(hpa["spec"]["maxReplicas"])]
    assert settings.TRITON_URLS == expected
    # the API key, if any, comes from a Secret that may be absent
    key = next(e for e in c["env"] if e["name"] == ENV_PREFIX + "API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True


def test_gateway_replicas_share_one_required_seed_secret(objects):
    """Every replica reads the noise key from the same Secret key, and cannot start without it: a replica
    with a key of its own would answer one client seed with other noise than its neighbours."""
    from service.app.core.config import ENV_PREFIX

    dep = get(objects, "Deployment", "gateway")
    env = {e["name"]: e for e in container(dep, "gateway")["env"]}
    ref = env[ENV_PREFIX + "SEED_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and ref.get("optional", False) is False
    assert "value" not in env[ENV_PREFIX + "SEED_SECRET"], "the secret must not be written into the manifest"
    assert not any(o["kind"] == "Secret" for o in objects), "no secret value belongs in the repository"
    assert env[ENV_PREFIX + "ALLOW_CLIENT_SEED"]["value"] in ("true", "false")


def test_pods_run_as_non_root_with_numeric_image_user(objects):
    dep = get(objects, "Deployment", "gateway")
    assert pod_spec(dep)["securityContext"]["runAsNonRoot"] is True
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "service" / "Dockerfile").read_text(), re.M)
    assert users and users[-1].isdigit() and users[-1] != "0"


# ---- autoscaling ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_rules(objects) -> list[dict]:
    cm = get(objects, "ConfigMap", "prometheus-adapter-config")
    dep = get(objects, "Deployment", "prometheus-adapter")
    args = container(dep, "prometheus-adapter")["args"]
    cfg_path = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
    mount = next(m for m in container(dep, "prometheus-adapter")["volumeMounts"]
                 if cfg_path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in pod_spec(dep)["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    return yaml.safe_load(cm["data"][Path(cfg_path).name])["rules"]


def test_hpas_scale_existing_workloads_on_metrics_the_adapter_serves(objects, adapter_rules):
    served = {r["name"]["as"] for r in adapter_rules}
    hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert {h["spec"]["scaleTargetRef"]["kind"] for h in hpas} == {"StatefulSet", "Deployment"}
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        target = get(objects, ref["kind"], ref["name"])
        assert target["metadata"]["namespace"] == h["metadata"]["namespace"]
        assert h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
        for m in h["spec"]["metrics"]:
            assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in served, m
    # the gateway scales out before it sheds: target in-flight below its MAX_IN_FLIGHT
    gw_hpa = next(h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == "gateway")
    env = {e["name"]: e.get("value") for e in container(get(objects, "Deployment", "gateway"), "gateway")["env"]}
    target = float(gw_hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"])
    assert 0 < target < int(env["DBP_GATEWAY_MAX_IN_FLIGHT"])


def test_adapter_series_are_real_metric_names(adapter_rules):
    from service.app.core.metrics import GatewayMetrics

    gateway_names = {f.name for f in GatewayMetrics().registry.collect()}
    # Triton's counters, checked against a live tritonserver in test_triton_balancing.py
    triton_names = {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    for r in adapter_rules:
        names = set(re.findall(r"\b((?:dbp_gateway|nv)_[a-z_]+)\b", r["seriesQuery"] + r["metricsQuery"]))
        assert names and names <= gateway_names | triton_names, names
    assert "dbp_gateway_in_flight_requests" in gateway_names


def test_adapter_metrics_queries_are_valid_promql(adapter_rules, tmp_path):
    """The adapter fills its Go templates per request; with typical values filled in, promtool parses each."""
    fills = {"<<.Series>>": None, "<<.LabelMatchers>>": 'namespace="dbp",pod=~"gateway-1|gateway-2"',
             "<<.GroupBy>>": "pod"}
    rules = []
    for i, r in enumerate(adapter_rules):
        series = re.match(r"\s*([a-zA-Z_:]+)", r["seriesQuery"]).group(1)
        q = r["metricsQuery"]
        for k, v in fills.items():
            q = q.replace(k, series if v is None else v)
        assert "<<" not in q, q
        rules.append({"record": f"adapter_rule_{i}", "expr": q})
        rules.append({"record": f"adapter_series_{i}", "expr": r["seriesQuery"]})
    f = tmp_path / "adapter.rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    res = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # a broken query does fail the same check
    rules[0]["expr"] += ")"
    f.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    assert subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True).returncode != 0


def test_adapter_reaches_prometheus_and_is_registered(objects):
    dep = get(objects, "Deployment", "prometheus-adapter")
    url = next(a.split("=", 1)[1] for a in container(dep, "prometheus-adapter")["args"]
               if a.startswith("--prometheus-url="))
    svc = get(objects, "Service", "prometheus")
    assert url.rstrip("/") == f"http://prometheus.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"
    api = get(objects, "APIService", "v1beta1.custom.metrics.k8s.io")
    asvc = get(objects, "Service", api["spec"]["service"]["name"])
    assert asvc["metadata"]["namespace"] == api["spec"]["service"]["namespace"]
    assert api["spec"]["service"]["port"] == asvc["spec"]["ports"][0]["port"]


# ---- Prometheus: pod discovery as a real Prometheus applies it --------------------------------------------

def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_meta_labels(obj: dict, pod_name: str, namespace: str) -> dict:
    """The __meta_kubernetes_pod_* labels Prometheus' pod discovery attaches to a pod of this template."""
    meta = obj["spec"]["template"]["metadata"]
    out = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod_name}
    for k, v in meta.get("labels", {}).items():
        out[f"__meta_kubernetes_pod_label_{_sanitize(k)}"] = v
    for k, v in meta.get("annotations", {}).items():
        out[f"__meta_kubernetes_pod_annotation_{_sanitize(k)}"] = v
    return out


def test_prometheus_finds_and_labels_the_pods(objects, tmp_path):
    """kubernetes_sd_configs cannot run without a cluster (and Debian's Prometheus is built without it), so
    each job's discovery is replaced by static targets that carry the labels pod discovery would give the
    pods these manifests create (one per declared container port, as Kubernetes SD does), plus pods that must
    be dropped. A real Prometheus then applies the committed relabelling."""
    prom_dep = get(objects, "Deployment", "prometheus")
    pc = container(prom_dep, "prometheus")
    cfg_file = next(a.split("=", 1)[1] for a in pc["args"] if a.startswith("--config.file="))
    cm = get(objects, "ConfigMap", "prometheus-config")
    cfg = yaml.safe_load(cm["data"][Path(cfg_file).name])
    mounts = {m["mountPath"]: m["name"] for m in pc["volumeMounts"]}
    assert mounts[str(Path(cfg_file).parent)] == "config"
    # the rules ConfigMap is mounted where rule_files looks
    rules_dir = str(Path(cfg["rule_files"][0]).parent)
    rules_vol = next(v for v in pod_spec(prom_dep)["volumes"] if v["name"] == mounts[rules_dir])
    assert rules_vol["configMap"]["name"] == "prometheus-rules"
    # job names as in monitoring/prometheus.yml: the alerts and the dashboard select on them
    reference = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert [j["job_name"] for j in cfg["scrape_configs"]] == [j["job_name"] for j in reference["scrape_configs"]]
    for j in cfg["scrape_configs"]:
        assert j["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["dbp"]}}]

    triton, gateway = get(objects, "StatefulSet", "triton"), get(objects, "Deployment", "gateway")
    pods = {"triton-0": (triton, "triton"), "gateway-7d9f-abcde": (gateway, "gateway")}
    targets = []
    for i, (pod, (obj, cname)) in enumerate(pods.items()):
        for p in container(obj, cname)["ports"]:
            targets.append({"targets": [f"10.1.{i}.7:{p['containerPort']}"],
                            "labels": pod_meta_labels(obj, pod, "dbp")})
    unannotated = pod_meta_labels(triton, "triton-9", "dbp")
    unannotated.pop("__meta_kubernetes_pod_annotation_prometheus_io_scrape")
    other_app = dict(pod_meta_labels(gateway, "other-1", "dbp"), __meta_kubernetes_pod_label_app_kubernetes_io_name="x")
    targets += [{"targets": ["10.1.9.7:8002"], "labels": unannotated}, {"targets": ["10.1.8.7:8080"], "labels": other_app}]
    local = copy.deepcopy(cfg)
    local["rule_files"] = [str(ROOT / "monitoring" / "rules" / "*.rules.yml")]
    for j in local["scrape_configs"]:
        j.pop("kubernetes_sd_configs")
        j["static_configs"] = targets
        j["scrape_interval"] = "1h"  # no scraping of the made-up addresses is needed, only the target list
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))
    res = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr

    with running_prometheus(tmp_path / "prometheus.yml", tmp_path) as url:
        deadline = time.monotonic() + 30
        while True:  # discovery hands targets over every 5 s
            data = json.loads(http_get(url + "/api/v1/targets")[1])["data"]
            if data["activeTargets"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    active = {(t["labels"]["job"], t["labels"]["pod"], t["scrapeUrl"]) for t in data["activeTargets"]}
    # each pod once per job it belongs to, at the port and path its annotations name, with pod/namespace labels
    assert active == {("triton", "triton-0", "http://10.1.0.7:8002/metrics"),
                      ("dbp-gateway", "gateway-7d9f-abcde", "http://10.1.1.7:8080/metrics")}
    assert all(t["labels"]["namespace"] == "dbp" for t in data["activeTargets"])
    # and the annotations name the ports the containers really serve metrics on
    assert triton["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
        port_number(container(triton, "triton"), "metrics"))
