"""The serving dashboard as code (grafana-foundation-sdk); writes the JSON that Grafana provisions.

  .venv/bin/python -m monitoring.grafana.dashboard            # rewrite dashboards/dbp-serving.json
  .venv/bin/python -m monitoring.grafana.dashboard --check    # exit 1 if the committed JSON is stale

Queries use the metric names of the gateway contract (dbp_gateway_*) and Triton's own counters (nv_*).
Triton reports latency as cumulative microsecond counters, so its per-request times are
rate(duration_us) / rate(success); the gateway's are histograms (quantiles and means).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

UID = "dbp-serving"
OUT = Path(__file__).resolve().parent / "dashboards" / f"{UID}.json"
# the provisioned datasource (provisioning/datasources/prometheus.yml) has this fixed uid
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="dbp-prometheus")
RI = "$__rate_interval"  # Grafana picks >= 4 scrape intervals; tests substitute a window

GW = 'dbp_gateway_requests_total{endpoint!="/metrics"}'
INFER = '{endpoint=~"/classify|/purify"}'  # the inference endpoints (health checks answer in microseconds)


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}[{RI}]))"


def ratio(num: str, den: str, by: str) -> str:
    """num/den per group; a group with traffic but no num events reads 0 (not "no data"), idle groups drop out."""
    return f"({rate(num, by)} or {rate(den, by)} * 0) / ({rate(den, by)} > 0)"


def per_request(total: str, count: str, by: str, scale: str = "") -> str:
    return f"{rate(total, by)} / ({rate(count, by)} > 0){scale}"


def quantile(q: float, hist: str, by: str) -> str:
    """hist may end in a {selector}: the _bucket suffix goes before it."""
    name, sel = (hist.split("{", 1) + [""])[:2]
    sel = "{" + sel if sel else ""
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({name}_bucket{sel}[{RI}])))"


def q(expr: str, legend: str, ref: str, instant: bool = False) -> prometheus.Dataquery:
    b = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
    return b.instant() if instant else b.range()


def ts(pid: int, title: str, desc: str, unit: str, targets: list[prometheus.Dataquery], w: int = 12,
       h: int = 8, min_val: float | None = 0) -> timeseries.Panel:
    p = (timeseries.Panel().id(pid).title(title).description(desc).unit(unit).datasource(DATASOURCE)
         .span(w).height(h).fill_opacity(10)
         .legend(cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
                 .placement(cm.LegendPlacement.BOTTOM).calcs(["mean", "max", "lastNotNull"])))
    if min_val is not None:
        p = p.min(min_val)
    for t in targets:
        p = p.with_target(t)
    return p


def build() -> dm.Dashboard:
    ns = "Triton's microsecond counters: rate(duration_us) / rate(success), per model and version."
    d = (db.Dashboard("DBP serving: gateway + Triton").uid(UID).tags(["dbp", "triton", "gateway"])
         .description("Diffusion-purification serving: the FastAPI gateway in front of Triton (purifier + classifier).")
         .refresh("10s").time("now-30m", "now").timezone("browser").editable()
         .tooltip(dm.DashboardCursorSync.CROSSHAIR))

    d = d.with_row(db.Row("Traffic and latency (gateway)").id(100))
    d = d.with_panel(ts(1, "Requests/s by endpoint and status",
                        "Answers per second, by endpoint and HTTP status (scrapes of /metrics left out).", "reqps",
                        [q(rate(GW, "endpoint, status"), "{{endpoint}} {{status}}", "A")]))
    d = d.with_panel(ts(2, "Error ratio by endpoint",
                        "Share of answers that are 5xx (Triton unavailable, timeouts, bugs) and 4xx (bad input, "
                        "auth, shedding with 429). Alert DbpGatewayHighErrorRatio: 5xx > 5% for 5 min.",
                        "percentunit",
                        [q(ratio('dbp_gateway_requests_total{endpoint!="/metrics", status=~"5.."}', GW, "endpoint"),
                           "{{endpoint}} 5xx", "A"),
                         q(ratio('dbp_gateway_requests_total{endpoint!="/metrics", status=~"4.."}', GW, "endpoint"),
                           "{{endpoint}} 4xx", "B")]))
    lat = 'dbp_gateway_request_duration_seconds'
    tri = 'dbp_gateway_triton_duration_seconds'
    triton_mean = per_request(tri + '_sum', tri + '_count', 'endpoint')
    d = d.with_panel(ts(3, "Gateway latency p50 / p95 / p99 by endpoint",
                        "From the gateway's request histogram (whole request: decode, Triton, encode). "
                        "Alert DbpGatewayHighLatencyP95: p95 > 5 s for 5 min.", "s",
                        [q(quantile(0.5, lat + INFER, "endpoint"), "{{endpoint}} p50", "A"),
                         q(quantile(0.95, lat + INFER, "endpoint"), "{{endpoint}} p95", "B"),
                         q(quantile(0.99, lat + INFER, "endpoint"), "{{endpoint}} p99", "C")]))
    d = d.with_panel(ts(4, "Gateway overhead per request (gateway latency - Triton time)",
                        "Mean request latency minus the mean time the same requests spent in Triton calls: what the "
                        "gateway itself adds (image decoding, validation, PNG encoding, its own queueing).", "s",
                        [q(f"{per_request(lat + '_sum', lat + '_count', 'endpoint')} - {triton_mean}",
                           "{{endpoint}} overhead", "A"),
                         q(triton_mean, "{{endpoint}} Triton time (gateway side)", "B")], min_val=None))
    d = d.with_panel(ts(5, "In-flight requests", "Requests inside the gateway now; past MAX_IN_FLIGHT it sheds "
                        "with 429/503 + Retry-After.", "short",
                        [q("sum by (instance) (dbp_gateway_in_flight_requests)", "{{instance}}", "A")], w=6))
    d = d.with_panel(ts(6, "Rejections/s by reason", "Requests the gateway refused, by reason (overload, "
                        "bad_image, body_too_large, triton_unavailable, timeout, ...).", "reqps",
                        [q(rate("dbp_gateway_rejections_total", "reason"), "{{reason}}", "A")], w=6))
    d = d.with_panel(ts(18, "/classify fallbacks/s by reason",
                        "/classify requests that took the two pinned calls (purifier/N, then classifier/N) instead "
                        "of one call to the purify_classify ensemble, by reason (not_newest, no_ensemble, "
                        "no_version_outputs, version_mismatch, ensemble_error, rejected = the ensemble refused the "
                        "request as INVALID_ARGUMENT, mostly client mistakes). A short spell while an export or "
                        "rollback is in flight is expected; a lasting one means the ensemble does not run the "
                        "pinned pair and every request pays a second Triton round trip. Alert "
                        "DbpGatewayClassifyFallbacks: > 5% of /classify requests over 10 min, for 15 min "
                        "(rejected not counted).", "reqps",
                        [q(rate("dbp_gateway_classify_fallbacks_total", "reason"), "{{reason}}", "A")], w=6))
    d = d.with_panel(ts(19, "Receipts withheld/s (card_mismatch)",
                        "Answers whose receipt had its robustness figures withheld (gate card_mismatch), by "
                        "endpoint: the card the gateway read is not the card Triton checked when it loaded the "
                        "version (the file was edited or replaced after the load, or the gateway mounts another "
                        "repository). Zero in a healthy deployment; the gateway log names the version, profile and "
                        "both sha256. Alert DbpGatewayCardMismatch: any in 5 min.", "reqps",
                        [q(rate("dbp_gateway_card_mismatch_total", "endpoint"), "{{endpoint}}", "A")], w=6))

    d = d.with_row(db.Row("Model and answers").id(101))
    d = d.with_panel(
        table.Panel().id(7).title("Deployed model versions")
        .description("A: the purifier/classifier pair the gateway pins (its info metric). B: versions Triton has "
                     "loaded (one series per model and version).")
        .datasource(DATASOURCE).span(12).height(8)
        .with_target(q("max by (model, purifier_version, classifier_version) (dbp_gateway_model_info)",
                       "{{model}} purifier {{purifier_version}} / classifier {{classifier_version}}", "A",
                       instant=True))
        .with_target(q("count by (model, version) (nv_inference_request_success)", "{{model}} v{{version}}", "B",
                       instant=True)))
    d = d.with_panel(
        stat.Panel().id(8).title("Triton backends ready / targets up")
        .description("A: 1 = the gateway sees that Triton URL ready. B: Prometheus scrape health of each target.")
        .datasource(DATASOURCE).span(12).height(8)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
            [dm.Threshold(value=None, color="red"), dm.Threshold(value=1, color="green")]))
        .with_target(q("max by (url) (dbp_gateway_triton_backend_ready)", "ready {{url}}", "A"))
        .with_target(q('up{job=~"dbp-gateway|triton"}', "up {{job}} {{instance}}", "B")))
    agr = "dbp_gateway_agreement"
    d = d.with_panel(ts(9, "Vote agreement", "Share of the k purifications that voted for the answered label "
                        "(requests with votes > 1): mean and 10th percentile. Low agreement = inputs near a "
                        "decision boundary or attacked.", "percentunit",
                        [q(f"sum(rate({agr}_sum[{RI}])) / (sum(rate({agr}_count[{RI}])) > 0)", "mean", "A"),
                         q(f"histogram_quantile(0.1, sum by (le) (rate({agr}_bucket[{RI}])))", "p10", "B")]))
    d = d.with_panel(ts(10, "Images and votes per request", "Mean images per request by endpoint, and mean votes "
                        "(purifications per image).", "short",
                        [q(per_request("dbp_gateway_images_per_request_sum", "dbp_gateway_images_per_request_count",
                                       "endpoint"), "{{endpoint}} images", "A"),
                         q(f"sum(rate(dbp_gateway_votes_sum[{RI}])) / (sum(rate(dbp_gateway_votes_count[{RI}])) > 0)",
                           "votes", "B")]))

    d = d.with_row(db.Row("Triton").id(102))
    for pid, (title, counter) in enumerate([("Triton request time per model", "nv_inference_request_duration_us"),
                                            ("Triton queue time per model", "nv_inference_queue_duration_us"),
                                            ("Triton compute time per model",
                                             "nv_inference_compute_infer_duration_us")], start=11):
        d = d.with_panel(ts(pid, title, f"Mean per successful request from {ns}", "s",
                            [q(per_request(counter, "nv_inference_request_success", "model, version", " / 1e6"),
                               "{{model}} v{{version}}", "A")], w=8))
    d = d.with_panel(ts(14, "Average dynamic batch size per model",
                        "Rows per model execution: rate(nv_inference_count) / rate(nv_inference_exec_count).",
                        "short",
                        [q(per_request("nv_inference_count", "nv_inference_exec_count", "model, version"),
                           "{{model}} v{{version}}", "A")], w=8))
    d = d.with_panel(ts(15, "Triton inferences/s per model", "Successful and failed requests per second.", "reqps",
                        [q(rate("nv_inference_request_success", "model"), "{{model}} ok", "A"),
                         q(rate("nv_inference_request_failure", "model"), "{{model}} failed", "B")], w=8))
    d = d.with_panel(ts(16, "Triton pending requests per model", "Requests queued in Triton, not yet executing.",
                        "short", [q("sum by (model) (nv_inference_pending_request_count)", "{{model}}", "A")], w=8))
    d = d.with_panel(ts(17, "Host CPU and memory (Triton's view)", "Whole-machine CPU utilisation and memory in "
                        "use, as Triton reports them (nv_cpu_*, system-wide): on a small CPU host, saturation here "
                        "explains queue time and latency.", "percentunit",
                        [q('max by (instance) (nv_cpu_utilization)', "CPU {{instance}}", "A"),
                         q('max by (instance) (nv_cpu_memory_used_bytes / nv_cpu_memory_total_bytes)',
                           "memory {{instance}}", "B")], w=24, h=6))
    return d.build()


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="fail if the committed JSON differs from the code")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    text = render()
    if a.check:
        if not a.out.exists() or a.out.read_text() != text:
            print(f"{a.out} is stale: run python -m monitoring.grafana.dashboard", file=sys.stderr)
            return 1
        return 0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
