"""The dashboard drawn from Prometheus' answers: every panel's queries over a time range, one subplot each.

  python -m monitoring.plot --duration 90s                 # stack + Prometheus + locust, then the figure
  python -m monitoring.plot --duration 90s --out docs/figures/ops_dashboard.png

No Grafana is needed (none is packaged here): the same PromQL the provisioned dashboard runs goes to a real
Prometheus that scraped a real gateway and Triton during a locust run, and matplotlib draws the series.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from monitoring.promserver import PrometheusServer, dashboard_targets

ROOT = Path(__file__).resolve().parent.parent


def legend(fmt: str, labels: dict) -> str:
    out = fmt or "{{__name__}}"
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    import re
    return re.sub(r"\{\{\s*\w+\s*\}\}", "", out).strip() or "value"


def fetch_panels(prom: PrometheusServer, start: float, end: float, step: float = 2.0,
                 rate_interval: str = "10s") -> list[dict]:
    """[{panel, title, unit, series: [(label, [t], [v])]}] in dashboard order (instant targets as range too)."""
    panels: dict[int, dict] = {}
    for t in dashboard_targets(rate_interval):
        p = panels.setdefault(t["panel"], {"panel": t["panel"], "title": t["title"], "unit": t["unit"], "series": []})
        for s in prom.query_range(t["expr"], start, end, step):
            ts = [float(x[0]) - start for x in s["values"]]
            vs = [float(x[1]) for x in s["values"]]
            p["series"].append((legend(t["legend"], s["metric"]), ts, vs))
    return list(panels.values())


def draw(panels: list[dict], out: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for label, ts, vs in p["series"][:12]:
            ax.plot(ts, vs, label=label[:40], lw=1.2)
        unit = {"percentunit": "ratio", "reqps": "req/s", "s": "seconds", "short": "", "bytes": "bytes"}.get(p["unit"],
                                                                                                          p["unit"])
        ax.set_title(f"{p['panel']}. {p['title']}", fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=.3)
        if p["series"]:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(.5, .5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since start of the load", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from loadtests.run import machine, parse_duration, run_locust
    from loadtests.images import render_pngs
    from loadtests.stack import Stack

    p = argparse.ArgumentParser(prog="python -m monitoring.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=parse_duration, default=90.0)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ops_dashboard.png")
    a = p.parse_args(argv)
    work = ROOT / "runs" / "dashboard-plot" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    render_pngs(work / "images", n=64)
    with Stack(a.repo, run_dir=work / "stack") as stack, \
            PrometheusServer({"dbp-gateway": stack.gateway_target, "triton": stack.triton_metrics_target},
                             scrape="2s") as prom:
        start = time.time()
        summary = run_locust(stack.gateway_url, "mixed", a.users, a.users, a.duration, work, work / "images")
        time.sleep(5)
        panels = fetch_panels(prom, start - 5, time.time(), step=2.0, rate_interval="20s")
    m = machine()
    allr = summary["all"]
    title = (f"DBP dashboard queries answered by Prometheus: locust mixed, {a.users} users, {a.duration:.0f} s, "
             f"{allr['rps']:.1f} req/s, p95 {allr['p95_ms']:.0f} ms, {allr['failures']} failed "
             f"({time.strftime('%Y-%m-%d')}, {m['cpus']} CPUs, load {m['loadavg_1m']})")
    print(f"wrote {draw(panels, a.out, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
