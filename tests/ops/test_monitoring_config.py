"""Prometheus config, alert rules and the Grafana dashboard, checked with the real promtool (no server needed).

The live side (a real Prometheus scraping a real gateway + Triton, every panel query evaluated) is in
test_prometheus_live.py.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "monitoring"
RULES = MON / "rules" / "dbp.rules.yml"
RULES_TEST = MON / "rules" / "rules_test.yml"
DASHBOARD = MON / "grafana" / "dashboards" / "dbp-serving.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

needs_promtool = pytest.mark.skipif(not Path(PROMTOOL).exists(),
                                    reason="promtool missing: `make system` (or apt-get install prometheus)")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alerts() -> dict[str, dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


@needs_promtool
def test_prometheus_config_and_rules_are_valid():
    r = promtool("check", "config", str(MON / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    # check config also checks the rule files it names: make sure it found ours
    assert "dbp.rules.yml" in r.stdout + r.stderr
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_alert_rule_unit_tests_pass():
    r = promtool("test", "rules", str(RULES_TEST))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    spec = yaml.safe_load(RULES_TEST.read_text())
    fired, quiet = set(), set()
    for t in spec["tests"]:
        for a in t.get("alert_rule_test", []):
            (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    names = set(alerts())
    assert len(names) >= 8
    assert names - fired == set(), f"alerts never shown to fire: {names - fired}"
    assert names - quiet == set(), f"alerts never shown to stay quiet: {names - quiet}"
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name


@needs_promtool
@pytest.mark.parametrize("name", sorted(alerts()))
def test_unit_tests_catch_an_alert_that_never_fires(name, tmp_path):
    """Mutation check: with the alert's expression replaced by one that is never true, the unit tests fail."""
    spec = yaml.safe_load(RULES.read_text())
    for g in spec["groups"]:
        for r in g["rules"]:
            if r.get("alert") == name:
                r["expr"] = "vector(0) > 1"
    (tmp_path / "dbp.rules.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    r = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert r.returncode != 0 and f"alertname: {name}" in r.stdout + r.stderr, r.stdout + r.stderr


# ---- the dashboard ------------------------------------------------------------------------------------

def panels() -> list[dict]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def test_dashboard_json_is_generated_from_the_code():
    from monitoring.grafana import dashboard
    assert DASHBOARD.read_text() == dashboard.render(), "run: python -m monitoring.grafana.dashboard"


def test_dashboard_structure():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    ds_uids = {ds["uid"] for ds in yaml.safe_load(
        (MON / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]}
    shown = [p for p in panels() if p["type"] != "row"]
    assert len(shown) >= 15
    for p in shown:
        assert p.get("datasource", {}).get("uid") in ds_uids, f"panel {p['id']} {p['title']}: datasource not set"
        assert p.get("targets"), f"panel {p['id']} {p['title']} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['id']} {p['title']} target {t.get('refId')}: empty expr"
            assert t.get("datasource", {}).get("uid") in ds_uids, f"panel {p['id']} target datasource"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['id']}: duplicate refIds"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, f"panel {p['id']} off the grid"


def test_dashboard_has_the_panels_operators_need():
    exprs = " ".join(t["expr"] for p in panels() for t in p.get("targets", []))
    # what issue 10 lists, by the metric (or formula) that shows it
    for needle in ["dbp_gateway_requests_total", 'status=~"5.."', "histogram_quantile(0.95",
                   "histogram_quantile(0.99", "histogram_quantile(0.5", "nv_inference_request_duration_us",
                   "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_request_success", "nv_inference_exec_count", "dbp_gateway_in_flight_requests",
                   "dbp_gateway_rejections_total", "dbp_gateway_agreement", "dbp_gateway_triton_duration_seconds",
                   "dbp_gateway_model_info"]:
        assert needle in exprs, f"no panel uses {needle}"
    # Triton time as rate(duration)/rate(success) and batch as rate(count)/rate(exec_count), not raw counters
    assert re.search(r"rate\(nv_inference_count\[[^]]+\]\)\) / \(sum by \(model, version\) "
                     r"\(rate\(nv_inference_exec_count", exprs)


def test_provisioning_points_at_the_dashboard_folder():
    prov = yaml.safe_load((MON / "grafana/provisioning/dashboards/dbp.yml").read_text())
    assert prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]
