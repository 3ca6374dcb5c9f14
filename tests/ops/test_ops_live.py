"""Operations against real servers: Triton (tiny models) + the gateway (real uvicorn) + a real Prometheus with
the project's prometheus.yml and rules, all on free loopback ports.

In order (one stack for the module, tests run top to bottom):
  1. Prometheus scrapes both targets and evaluates every rule without error
  2. traffic through the gateway, then EVERY dashboard query evaluated through Prometheus' HTTP API returns data
  3. `python -m loadtests.run` against the stack (locust headless): reports written, 0 failures
  4. short drills: soak, overload (second gateway, small in-flight limit), Triton SIGKILL + restart (the Triton
     alerts go pending in the real Prometheus meanwhile), version swap under load; figures -> drills.json
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

prom_mod = pytest.importorskip("monitoring.promserver")
if not Path(prom_mod.PROMETHEUS).exists():
    pytest.skip("prometheus missing: `make system` (apt-get install prometheus)", allow_module_level=True)

from loadtests import drills  # noqa: E402
from loadtests.images import UPLOAD_FIELD  # noqa: E402
from loadtests.stack import GatewayConfig  # noqa: E402
from monitoring.promserver import PrometheusServer, dashboard_targets  # noqa: E402

REPORT: dict = {}


def save_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
PLAN = {"calibrate": 4, "soak": 8, "overload": 6, "kill_before": 2, "kill_down": 3, "kill_after": 2}


@pytest.fixture(scope="module")
def prom(ops_stack, tmp_path_factory):
    with PrometheusServer({"dbp-gateway": ops_stack.gateway_target, "triton": ops_stack.triton_metrics_target},
                          scrape="1s", work_dir=tmp_path_factory.mktemp("prom")) as p:
        yield p


def finite_values(series: list[dict]) -> int:
    return sum(1 for s in series for _, v in (s.get("values") or [s.get("value")]) if math.isfinite(float(v)))


def test_prometheus_scrapes_gateway_and_triton_and_rules_evaluate(prom):
    """Checked by mutation of monitoring/rules/dbp.rules.yml (2026-12-06, after the fixed wait became a poll for
    the first evaluation): a recording rule `up + on() group_left up` (many-to-many at evaluation) fails."""
    up = prom.wait_for('count(up{job=~"dbp-gateway|triton"} == 1) == 2', timeout=30)
    assert up, f"targets: {prom.targets_health()}\n{prom.log_tail()}"
    time.sleep(3)  # a few rule evaluations (1 s interval)
    deadline = time.monotonic() + 30  # and on a loaded machine, until every rule has been evaluated once
    while True:
        groups = prom.api("rules")["groups"]
        if all(r["health"] != "unknown" for g in groups for r in g["rules"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {g["name"] for g in groups} == {"dbp-gateway.recording", "triton.recording", "dbp.alerts"}
    for g in groups:
        for r in g["rules"]:
            assert r["health"] == "ok" and not r.get("lastError"), f"rule {r['name']}: {r.get('lastError')}"
    # a healthy stack pages nobody (pending included: every alert's condition is false)
    serving_alerts = "DbpGatewayDown|DbpTritonDown|DbpTritonNotReady|DbpTritonModelNotLoaded"
    assert prom.query(f'ALERTS{{alertname=~"{serving_alerts}"}}') == []


def drive_traffic(url: str, images, seconds: float = 6.0) -> dict:
    """A bit of everything the dashboard shows: single and batched /classify, votes, /purify, a bad upload."""
    counts: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=120) as c:
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end or i < 6:
            (n1, d1), (n2, d2) = images[i % len(images)], images[(i + 1) % len(images)]
            one = [(UPLOAD_FIELD, (n1, d1, "image/png"))]
            two = one + [(UPLOAD_FIELD, (n2, d2, "image/png"))]
            for path, files, params in [("/classify", one, {}), ("/classify", two, {"votes": 3}),
                                        ("/purify", one, {})]:
                r = c.post(path, files=files, params=params)
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
                counts[path] = counts.get(path, 0) + 1
            i += 1
        r = c.post("/classify", files=[(UPLOAD_FIELD, ("junk.png", b"this is not an image", "image/png"))])
        assert 400 <= r.status_code < 500, r.text
    return counts


def test_every_dashboard_query_returns_data(prom, ops_stack, ops_images, artefacts):
    t0 = time.time()
    counts = drive_traffic(ops_stack.gateway_url, ops_images)
    time.sleep(4)  # >= 3 scrapes after the last request
    t1 = time.time()
    targets = dashboard_targets(rate_interval="10s")
    assert len({t["panel"] for t in targets}) >= 15
    problems, results = [], {}
    for t in targets:
        key = f"panel {t['panel']} {t['title']!r} {t['ref']}"
        try:
            res = prom.query(t["expr"], at=t1) if t["instant"] else prom.query_range(t["expr"], t0 - 2, t1, 1)
        except prom_mod.PrometheusError as e:
            problems.append(f"{key}: error {e}")
            continue
        n = finite_values(res)
        results[key] = {"series": len(res), "finite_points": n}
        if not res or n == 0:
            problems.append(f"{key}: no data for {t['expr']}")
    save_json(artefacts / "dashboard_queries.json", results)
    assert not problems, "\n".join(problems)

    # the figures agree with what was sent: /classify requests counted by Prometheus ~ requests made
    sent = counts["/classify"] + 1  # + the rejected upload
    seen = prom.query('sum(dbp_gateway_requests_total{endpoint="/classify"})', at=t1)
    assert seen and float(seen[0]["value"][1]) >= sent
    batch = prom.query_range('sum(rate(nv_inference_count{model="classifier"}[10s])) / '
                             'sum(rate(nv_inference_exec_count{model="classifier"}[10s]) > 0)', t0, t1, 1)
    assert batch and max(float(v) for _, v in batch[0]["values"]) >= 1.0
    # a picture of the same answers, kept as a test artefact
    from monitoring.plot import draw, fetch_panels
    draw(fetch_panels(prom, t0 - 2, t1, 1.0, "10s"), artefacts / "dashboard_queries.png", "ops test traffic")


def test_metric_names_in_dashboard_and_rules_exist(prom):
    """Contract drift check: every dbp_gateway_* / nv_* name the dashboard and rules use is really exported."""
    exported = {r["metric"]["__name__"] for r in prom.query('count by (__name__) ({job=~"dbp-gateway|triton"})')}
    rules = yaml.safe_load((ROOT / "monitoring/rules/dbp.rules.yml").read_text())
    exprs = [t["expr"] for t in dashboard_targets()] + [r["expr"] for g in rules["groups"] for r in g["rules"]]
    # raw metric names only: not the recorded series (level:name:op) built from them
    used = {n for e in exprs for n in re.findall(r"(?<![:\w])((?:dbp_gateway|nv)_\w+)", e)}
    assert len(used) >= 15
    missing = sorted(n for n in used if n not in exported)
    assert not missing, f"used but not exported: {missing}"


def test_locust_run_writes_reports(ops_stack, tmp_path):
    out = tmp_path / "lt"
    r = subprocess.run([sys.executable, "-m", "loadtests.run", "--host", ops_stack.gateway_url, "--users", "2",
                        "--duration", "6s", "--images", "8", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["all"]["requests"] > 0 and summary["all"]["failures"] == 0
    assert summary["all"]["p95_ms"] >= summary["all"]["p50_ms"] > 0
    assert (out / "report.html").stat().st_size > 10_000 and (out / "locust_stats.csv").exists()
    assert "req/s" in r.stdout and "p95" in r.stdout
    # the locust checks have teeth: against a wrong URL every request fails and the run says so
    bad = subprocess.run([sys.executable, "-m", "loadtests.run", "--host", ops_stack.gateway_url + "/nothing",
                          "--users", "1", "--duration", "2s", "--images", "4", "--out", str(tmp_path / "bad")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert bad.returncode == 1 and "failure ratio" in bad.stderr


# ---- drills (short forms) ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def capacity(ops_stack, ops_images) -> float:
    cal = drills.calibrate(ops_stack, ops_images, PLAN["calibrate"])
    REPORT["calibrate"] = cal
    assert cal["ok"] and cal["capacity_rps"] > 0, cal
    return cal["capacity_rps"]


def test_soak_below_capacity(ops_stack, ops_images, capacity):
    d = REPORT["soak"] = drills.soak(ops_stack, ops_images, capacity, PLAN["soak"])
    assert d["requests"] >= 3 and d["failed"] == 0, d["reasons"]
    assert d["ok"], d["reasons"]


def test_overload_sheds_and_recovers(ops_stack, ops_images, capacity):
    small = ops_stack.extra_gateway(GatewayConfig(max_in_flight=2))
    try:
        d = REPORT["overload"] = drills.overload(small, ops_images, capacity, PLAN["overload"], max_in_flight=2)
    finally:
        small.stop()
    assert d["shed"] > 0 and d["retry_after"], d
    assert d["ok"], d["reasons"]


def test_triton_sigkill_then_restart(ops_stack, ops_images, capacity, prom):
    """Checked by mutation of monitoring/rules/dbp.rules.yml (2026-12-06, after the fixed 3 s wait became a
    30 s poll): DbpTritonDown on `up{job="triton"} >= 0`, an alert that never clears, fails."""
    t0 = time.time()
    d = REPORT["triton_kill"] = drills.triton_kill(ops_stack, ops_images, capacity, PLAN["kill_before"],
                                                   PLAN["kill_down"], PLAN["kill_after"])
    t1 = time.time()
    assert d["ok"], d["reasons"]
    assert d["lost_outside_outage"] == 0 and d["during_outage"]["by_status"].get("503", 0) > 0
    # the real Prometheus saw it: Triton's target down and the gateway's backend gauge at 0, so the
    # DbpTritonDown / DbpTritonNotReady alerts went pending (their `for` is longer than this short outage)
    pending = prom.query_range('max by (alertname) (ALERTS{alertname=~"DbpTritonDown|DbpTritonNotReady"})',
                               t0, t1 + 3, 1)
    assert {s["metric"]["alertname"] for s in pending} == {"DbpTritonDown", "DbpTritonNotReady"}, pending
    # they clear once Prometheus has scraped the restarted Triton and evaluated the rules (1 s each): polled,
    # as a fixed wait is a verdict on the machine's load
    deadline = time.monotonic() + 30
    while (left := prom.query('ALERTS{alertname=~"DbpTritonDown|DbpTritonNotReady"}')) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"alerts did not clear: {left}"


def test_version_swap_under_load(ops_stack, ops_images, capacity, ops_repo):
    d = REPORT["version_swap"] = drills.version_swap(
        ops_stack, ops_images, capacity, [drills.republish(ops_repo, 1), drills.republish(ops_repo, 1)],
        settle_limit=120)
    assert d["published"] == [2, 3]
    assert d["failed"] == 0 and d["mixed_versions"] == 0, d["reasons"]
    assert d["ok"], d["reasons"]
    assert {"2/2", "3/3"} <= set(d["pairs_served"])


def test_write_drill_report(artefacts):
    assert {"calibrate", "soak", "overload", "triton_kill", "version_swap"} <= set(REPORT), sorted(REPORT)
    save_json(artefacts / "drills_short.json", REPORT)
