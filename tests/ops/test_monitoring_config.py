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


FALLBACK_SHARE = ('sum(rate(dbp_gateway_classify_fallbacks_total{reason!="rejected"}[10m]))\n'
                  '/ (sum(rate(dbp_gateway_requests_total{endpoint="/classify"}[10m])) > 0) > 0.05\n')


@needs_promtool
@pytest.mark.parametrize("field, value", [
    ("for", "5m"),  # a 4-min export spell would page
    ("expr", "sum(rate(dbp_gateway_classify_fallbacks_total[10m])) > 0"),  # stray ensemble errors would page
    ("expr", FALLBACK_SHARE.replace("> 0.05", "> 0.01")),  # 2% stray errors would page
    ("expr", FALLBACK_SHARE.replace('endpoint="/classify"', 'endpoint=~"/classify|/purify"')),  # 10% reads 2.5%
    ("expr", FALLBACK_SHARE.replace('{reason!="rejected"}', "")),  # clients' rejected requests would page
], ids=["for-5m", "rate-above-0", "share-1pct", "purify-in-denominator", "rejected-in-numerator"])
def test_unit_tests_pin_the_fallback_alert_choices(field, value, tmp_path):
    """DbpGatewayClassifyFallbacks: the share over 10 min, of /classify only, rejected requests left out, above 5%,
    for 15 min. Each looser or wrong variant makes rules_test.yml fail (the quiet export spell, the quiet stray errors,
    the quiet rejected requests, the firing 10% share)."""
    spec = yaml.safe_load(RULES.read_text())
    rule = next(r for g in spec["groups"] for r in g["rules"] if r.get("alert") == "DbpGatewayClassifyFallbacks")
    assert rule["expr"] == FALLBACK_SHARE, "the rule changed: update FALLBACK_SHARE and these mutations"
    assert rule["for"] == "15m"
    rule[field] = value
    (tmp_path / "dbp.rules.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    r = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert r.returncode != 0 and "alertname: DbpGatewayClassifyFallbacks" in r.stdout + r.stderr, r.stdout + r.stderr


CARD_MISMATCH = "sum by (endpoint) (increase(dbp_gateway_card_mismatch_total[5m])) > 0"


@needs_promtool
@pytest.mark.parametrize("field, value", [
    ("for", "5m"),  # a withheld receipt would never page: the 5-min increase is gone before
    ("expr", CARD_MISMATCH.replace("> 0", "> 1")),  # one withheld receipt must page
    ("expr", CARD_MISMATCH.replace("[5m]", "[1m]")),  # a glance at the wrong minute would miss it
    ("expr", "sum(increase(dbp_gateway_card_mismatch_total[5m])) > 0"),  # the alert must name the endpoint
], ids=["for-5m", "above-1", "window-1m", "no-endpoint"])
def test_unit_tests_pin_the_card_mismatch_alert_choices(field, value, tmp_path):
    """DbpGatewayCardMismatch: any withheld receipt in 5 min, per endpoint, at once, critical (a trust failure).
    Each variant makes rules_test.yml fail; the flat and restarted counters keep the quiet side."""
    spec = yaml.safe_load(RULES.read_text())
    rule = next(r for g in spec["groups"] for r in g["rules"] if r.get("alert") == "DbpGatewayCardMismatch")
    assert rule["expr"].strip() == CARD_MISMATCH, "the rule changed: update CARD_MISMATCH and these mutations"
    assert rule["for"] == "0m" and rule["labels"]["severity"] == "critical"
    rule[field] = value
    (tmp_path / "dbp.rules.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    r = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert r.returncode != 0 and "alertname: DbpGatewayCardMismatch" in r.stdout + r.stderr, r.stdout + r.stderr


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
                   "dbp_gateway_model_info", "dbp_gateway_classify_fallbacks_total"]:
        assert needle in exprs, f"no panel uses {needle}"
    # Triton time as rate(duration)/rate(success) and batch as rate(count)/rate(exec_count), not raw counters
    assert re.search(r"rate\(nv_inference_count\[[^]]+\]\)\) / \(sum by \(model, version\) "
                     r"\(rate\(nv_inference_exec_count", exprs)


def test_classify_fallback_panel_sits_with_the_request_rate_panels():
    """Fallbacks/s by reason, in the gateway's traffic row, on the line of the rejections/s panel, like it."""
    ps = {p["title"]: p for p in panels()}
    fb, rej = ps["/classify fallbacks/s by reason"], ps["Rejections/s by reason"]
    assert [t["expr"] for t in fb["targets"]] == [
        "sum by (reason) (rate(dbp_gateway_classify_fallbacks_total[$__rate_interval]))"]
    assert fb["targets"][0]["legendFormat"] == "{{reason}}"
    assert fb["type"] == rej["type"] == "timeseries"
    assert fb["fieldConfig"]["defaults"]["unit"] == rej["fieldConfig"]["defaults"]["unit"] == "reqps"
    assert fb["options"]["legend"] == rej["options"]["legend"]
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in panels() if p["type"] == "row")
    traffic = [y for y, t in rows if t.startswith("Traffic")][0]
    following = min(y for y, _ in rows if y > traffic)
    assert traffic < fb["gridPos"]["y"] == rej["gridPos"]["y"] < following
    assert fb["gridPos"]["x"] == rej["gridPos"]["x"] + rej["gridPos"]["w"]
    assert "DbpGatewayClassifyFallbacks" in fb["description"]


def test_card_mismatch_panel_sits_beside_the_fallback_panel():
    """Withheld receipts per endpoint, on the fallback panel's line, right of it, like it."""
    ps = {p["title"]: p for p in panels()}
    cm, fb = ps["Receipts withheld/s (card_mismatch)"], ps["/classify fallbacks/s by reason"]
    assert [t["expr"] for t in cm["targets"]] == [
        "sum by (endpoint) (rate(dbp_gateway_card_mismatch_total[$__rate_interval]))"]
    assert cm["targets"][0]["legendFormat"] == "{{endpoint}}"
    assert cm["type"] == fb["type"] and cm["fieldConfig"]["defaults"]["unit"] == "reqps"
    assert cm["gridPos"]["y"] == fb["gridPos"]["y"] and cm["gridPos"]["x"] == fb["gridPos"]["x"] + fb["gridPos"]["w"]
    assert cm["gridPos"]["x"] + cm["gridPos"]["w"] <= 24
    assert "DbpGatewayCardMismatch" in cm["description"]


def test_alerts_named_in_panel_descriptions_exist():
    named = {n for p in panels() for n in re.findall(r"\bAlert (Dbp\w+)", p.get("description", ""))}
    assert {"DbpGatewayClassifyFallbacks", "DbpGatewayCardMismatch"} <= named
    assert named <= set(alerts()), f"panels name alerts that do not exist: {named - set(alerts())}"


def test_gateway_metric_names_used_are_ones_the_gateway_defines():
    """Without a live stack: every dbp_gateway_* name of the dashboard and the rules is a series name of the
    gateway's own registry (service/app/core/metrics.py). The live test checks the same against a real scrape."""
    from monitoring.promserver import dashboard_targets
    from service.app.core.metrics import GatewayMetrics
    suffixes = {"counter": ["_total", "_created"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"], "info": ["_info"]}
    defined = {f.name + sfx for f in GatewayMetrics().registry.collect() for sfx in suffixes.get(f.type, [""])}
    rules = yaml.safe_load(RULES.read_text())
    exprs = [t["expr"] for t in dashboard_targets()] + [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {n for e in exprs for n in re.findall(r"(?<![:\w])(dbp_gateway_\w+)", e)}
    assert {"dbp_gateway_classify_fallbacks_total", "dbp_gateway_card_mismatch_total"} <= used
    assert used - defined == set(), f"used but not defined by the gateway: {sorted(used - defined)}"


def test_provisioning_points_at_the_dashboard_folder():
    prov = yaml.safe_load((MON / "grafana/provisioning/dashboards/dbp.yml").read_text())
    assert prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]
