"""Operational drills against a real local stack (Triton + gateway on loopback), with a JSON report.

  python -m loadtests.drills                 # short forms (tens of seconds each), model_repository/
  python -m loadtests.drills --long          # soak for minutes, longer overload / outage / swap phases
  python -m loadtests.drills --only soak overload --out runs/drills

Drills (each bounded in time and request count; open-loop load at a fixed rate, one PNG per /classify):
  calibrate  closed-loop capacity c (req/s) of this stack on this machine, now
  soak       0.5c for a while: 0 failed requests; gateway and Triton RSS growth after warm-up < 10%
  overload   2c with a small in-flight limit: shed with 429/503 + Retry-After, accepted latency bounded,
             no other errors, and full service again once the load drops
  triton_kill  SIGKILL tritonserver mid-load, restart it on the same ports: 503 (never a hang) and /readyz 503
             while down, recovery without restarting the gateway; requests lost counted
  version_swap export new versions under load (training/export.py): 0 failed requests and no answer whose
             purifier and classifier versions differ

Figures and pass/fail reasons go to <out>/drills.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import httpx

from dbp import repository
from loadtests.images import UPLOAD_FIELD, load_pngs, render_pngs
from loadtests.stack import GatewayConfig, Stack
from service.process import GatewayProcess, http_status

ROOT = Path(__file__).resolve().parent.parent
SHED = (429, 503)


@dataclass
class Outcome:
    start: float  # monotonic seconds
    end: float
    status: Optional[int]  # None: no HTTP answer (timeout, connection error)
    error: Optional[str] = None
    retry_after: Optional[str] = None
    purifier: Optional[str] = None  # versions reported by the answer (headers and body must agree)
    classifier: Optional[str] = None
    mixed: bool = False

    @property
    def latency(self) -> float:
        return self.end - self.start


def pct(xs: Sequence[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


class Load:
    """Fixed-rate (open-loop) /classify traffic from an asyncio loop in a background thread."""

    def __init__(self, url: str, images: list[tuple[str, bytes]], timeout: float = 30.0, max_outstanding: int = 400,
                 api_key: Optional[str] = None):
        self.url, self.images, self.timeout = url, images, timeout
        self.max_outstanding = max_outstanding
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.outcomes: list[Outcome] = []
        self.skipped = 0  # not sent because max_outstanding requests were already waiting (client-side bound)

    async def _one(self, client: httpx.AsyncClient) -> None:
        name, data = random.choice(self.images)
        t0 = time.monotonic()
        try:
            r = await client.post("/classify", files=[(UPLOAD_FIELD, (name, data, "image/png"))],
                                  headers=self.headers)
        except httpx.TimeoutException:
            self.outcomes.append(Outcome(t0, time.monotonic(), None, "timeout"))
            return
        except httpx.HTTPError as e:
            self.outcomes.append(Outcome(t0, time.monotonic(), None, type(e).__name__))
            return
        o = Outcome(t0, time.monotonic(), r.status_code, retry_after=r.headers.get("Retry-After"))
        if r.status_code == 200:
            o.purifier, o.classifier = r.headers.get("X-Purifier-Version"), r.headers.get("X-Classifier-Version")
            try:
                m = r.json()["model"]
                body = (str(m.get("purifier_version")), str(m.get("classifier_version")))
            except (ValueError, KeyError, TypeError):
                body = (None, None)
            o.mixed = o.purifier is None or o.purifier != o.classifier or body != (o.purifier, o.classifier)
        else:
            o.error = r.text[:200]
        self.outcomes.append(o)

    async def _run(self, rate: float, duration: float, stop: threading.Event) -> None:
        limits = httpx.Limits(max_connections=self.max_outstanding, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits) as client:
            tasks: set[asyncio.Task] = set()
            t0, i = time.monotonic(), 0
            while not stop.is_set():
                due = t0 + i / rate
                if due - t0 >= duration:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                i += 1
                if len(tasks) >= self.max_outstanding:
                    self.skipped += 1
                    continue
                t = asyncio.create_task(self._one(client))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

    def run(self, rate: float, duration: float) -> list[Outcome]:
        """Blocking: send at `rate` req/s for `duration` s, wait for every answer (each bounded by timeout)."""
        start = len(self.outcomes)
        asyncio.run(self._run(rate, duration, threading.Event()))
        return self.outcomes[start:]

    def start(self, rate: float, duration: float) -> Callable[[], list[Outcome]]:
        """Non-blocking; returns a join() that stops early if called before `duration` ends."""
        stop, start = threading.Event(), len(self.outcomes)
        th = threading.Thread(target=lambda: asyncio.run(self._run(rate, duration, stop)), daemon=True)
        th.start()

        def join(stop_now: bool = False) -> list[Outcome]:
            if stop_now:
                stop.set()
            th.join(duration + self.timeout + 30)
            return self.outcomes[start:]
        return join


def closed_loop(url: str, images, concurrency: int, duration: float, timeout: float = 60.0) -> list[Outcome]:
    """`concurrency` clients back to back: what the stack sustains (calibration)."""
    load = Load(url, images, timeout)

    async def worker(client, end):
        while time.monotonic() < end:
            await load._one(client)

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            end = time.monotonic() + duration
            await asyncio.gather(*(worker(client, end) for _ in range(concurrency)))
    asyncio.run(main())
    return load.outcomes


def stats(outs: Sequence[Outcome]) -> dict:
    ok = [o for o in outs if o.status == 200]
    lat = [o.latency for o in ok]
    span = (max(o.end for o in outs) - min(o.start for o in outs)) if outs else 0.0
    by_status: dict[str, int] = {}
    for o in outs:
        k = str(o.status) if o.status is not None else (o.error or "no answer")
        by_status[k] = by_status.get(k, 0) + 1
    bad = [o.latency for o in outs if o.status != 200]
    return {"requests": len(outs), "served": len(ok), "failed": len(outs) - len(ok), "by_status": by_status,
            "failed_p95_s": _r(pct(bad, .95)), "failed_max_s": _r(max(bad) if bad else None),
            "ok_per_s": round(len(ok) / span, 2) if span else 0.0,
            "p50_s": _r(pct(lat, .5)), "p95_s": _r(pct(lat, .95)), "p99_s": _r(pct(lat, .99)),
            "max_s": _r(max(lat) if lat else None), "mixed_versions": sum(o.mixed for o in ok)}


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 3)


# ---- drills --------------------------------------------------------------------------------------------

def calibrate(stack: Stack, images, seconds: float, concurrency: int = 4) -> dict:
    closed_loop(stack.gateway_url, images, concurrency, min(2.0, seconds / 2))  # warm-up: first batches, caches
    outs = closed_loop(stack.gateway_url, images, concurrency, seconds)
    s = stats(outs)
    return {"concurrency": concurrency, "seconds": seconds, **s, "capacity_rps": s["ok_per_s"],
            "ok": s["failed"] == 0 and s["served"] > 0,
            "reasons": [] if s["failed"] == 0 else ["failures while calibrating"]}


def soak(stack: Stack, images, capacity: float, seconds: float, load_factor: float = 0.5,
         warmup_frac: float = 0.25, max_growth: float = 0.10) -> dict:
    rate = max(0.2, load_factor * capacity)
    load = Load(stack.gateway_url, images)
    join = load.start(rate, seconds)
    samples: list[tuple[float, dict]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        samples.append((time.monotonic() - t0, stack.rss()))
        time.sleep(min(1.0, seconds / 20))
    outs = join()
    samples.append((time.monotonic() - t0, stack.rss()))
    after_warmup = [r for t, r in samples if t >= warmup_frac * seconds]
    growth = {}
    for proc in ("gateway", "triton"):
        base, end = after_warmup[0].get(proc), samples[-1][1].get(proc)
        growth[proc] = round((end - base) / base, 4) if base and end else None
    s = stats(outs)
    reasons = []
    if s["failed"] or load.skipped:
        reasons.append(f"{s['failed']} failed requests at {rate:.2f} req/s: {s['by_status']}; "
                       f"{load.skipped} not sent (client bound)")
    for proc, g in growth.items():
        if g is None or g >= max_growth:
            reasons.append(f"{proc} RSS grew {g} after warm-up (limit {max_growth})")
    return {"rate_rps": round(rate, 2), "seconds": seconds, **s, "client_skipped": load.skipped,
            "rss_growth_after_warmup": growth,
            "rss_mib": {p: round(samples[-1][1].get(p, 0) / 2**20, 1) for p in ("gateway", "triton")},
            "rss_samples": [(round(t, 1), {k: round(v / 2**20, 1) for k, v in r.items()}) for t, r in samples],
            "ok": not reasons, "reasons": reasons}


def overload(gateway: GatewayProcess, images, capacity: float, seconds: float, max_in_flight: int,
             factor: float = 2.0, recovery_seconds: float = 5.0) -> dict:
    """`gateway` must run with MAX_IN_FLIGHT = max_in_flight (small, so 2x capacity sheds rather than queues)."""
    rate = factor * capacity
    load = Load(gateway.url, images)
    outs = load.run(rate, seconds)
    shed = [o for o in outs if o.status in SHED]
    accepted = [o for o in outs if o.status == 200]
    other = [o for o in outs if o.status not in SHED and o.status != 200]
    # an accepted request waits for at most max_in_flight others served at `capacity`: bound it with slack
    # for a loaded machine. An unbounded queue would instead grow by (factor-1)*capacity*seconds requests.
    bound = max(4.0 * max_in_flight / capacity, 2.0)
    p95 = pct([o.latency for o in accepted], .95)
    shed_fast = pct([o.latency for o in shed], .95)
    time.sleep(1.0)
    # "load drops" to a rate this small-limit gateway sustains with room to spare (c was measured with 4
    # clients; with max_in_flight 2 at 0.5c, clustered arrivals already meet a full gateway now and then)
    rec = Load(gateway.url, images).run(max(0.2, 0.25 * capacity), recovery_seconds)
    rs = stats(rec)
    reasons = []
    if not shed:
        reasons.append("nothing shed at 2x capacity")
    if any(o.retry_after is None for o in shed):
        reasons.append(f"{sum(o.retry_after is None for o in shed)} shed answers without Retry-After")
    if other or load.skipped:
        reasons.append(f"{len(other)} answers other than 200/429/503: {stats(other)['by_status'] if other else {}}; "
                       f"{load.skipped} not sent because {load.max_outstanding} were waiting (no shedding?)")
    if p95 is None or p95 > bound:
        reasons.append(f"accepted p95 {p95} s above the bound {bound:.2f} s")
    if rs["failed"]:
        reasons.append(f"{rs['failed']} failures after the load dropped: {rs['by_status']}")
    if not gateway.proc or gateway.proc.poll() is not None:
        reasons.append("gateway process died")
    return {"rate_rps": round(rate, 2), "capacity_rps": round(capacity, 2), "max_in_flight": max_in_flight,
            "seconds": seconds, **stats(outs), "client_skipped": load.skipped, "shed": len(shed),
            "shed_ratio": round(len(shed) / max(len(outs), 1), 3),
            "shed_p95_s": _r(shed_fast), "accepted_p95_s": _r(p95), "accepted_bound_s": round(bound, 2),
            "retry_after": sorted({o.retry_after for o in shed if o.retry_after}),
            "recovery": rs, "ok": not reasons, "reasons": reasons}


def triton_kill(stack: Stack, images, capacity: float, before: float, down: float, after: float,
                hang_limit: float = 10.0, recovery_limit: float = 60.0) -> dict:
    rate = max(0.5, 0.5 * capacity)
    gw_pid = stack.gateway.pid
    load = Load(stack.gateway_url, images, timeout=max(30.0, hang_limit * 3))
    join = load.start(rate, before + down + after + stack.triton_ready_timeout)
    time.sleep(before)
    t_kill = time.monotonic()
    stack.kill_triton()  # returns once the server and its stubs are gone (seconds on a busy machine)
    readyz_down: list[Optional[int]] = []
    t_gone = time.monotonic()
    while time.monotonic() - t_gone < down:
        readyz_down.append(http_status(stack.gateway_url + "/readyz"))
        time.sleep(0.25)
    t_restart = time.monotonic()
    restart_s = stack.restart_triton()
    t_triton_ready = time.monotonic()
    t_back = None  # first /readyz 200 after the restart
    while time.monotonic() - t_triton_ready < recovery_limit:
        if http_status(stack.gateway_url + "/readyz") == 200:
            t_back = time.monotonic()
            break
        time.sleep(0.1)
    time.sleep(after)
    outs = join(stop_now=True)
    window_end = t_back if t_back is not None else float("inf")
    at_risk = [o for o in outs if o.end >= t_kill and o.start <= window_end]
    safe = [o for o in outs if o not in at_risk]
    lost = [o for o in at_risk if o.status != 200]
    during = [o for o in outs if t_kill + 1.0 <= o.start <= t_restart]  # clearly while Triton was gone
    reasons = []
    if [o for o in safe if o.status != 200]:
        reasons.append(f"{sum(o.status != 200 for o in safe)} requests failed outside the outage "
                       f"{stats([o for o in safe if o.status != 200])['by_status']}")
    hung = [o for o in during if o.status is None or o.latency > hang_limit]
    if hung:
        reasons.append(f"{len(hung)} requests hung or got no answer while Triton was down")
    bad = [o for o in during if o.status is not None and o.status != 503]
    if bad:
        reasons.append(f"answers other than 503 while down: {stats(bad)['by_status']}")
    if any(o.status == 503 and o.retry_after is None for o in during):
        reasons.append("503 without Retry-After while down")
    if len(readyz_down) < 5 or any(s != 503 for s in readyz_down[4:]):  # ~1 s for the probe to notice
        reasons.append(f"/readyz while down: {sorted(set(map(str, readyz_down)))}")
    if t_back is None:
        reasons.append(f"gateway not ready {recovery_limit} s after Triton came back")
    if stack.gateway.pid != gw_pid or stack.gateway.proc.poll() is not None:
        reasons.append("gateway was restarted or died")
    return {"rate_rps": round(rate, 2), "down_s": round(t_restart - t_kill, 2), "triton_restart_s": round(restart_s, 2),
            "gateway_recovery_s": _r(t_back - t_triton_ready if t_back else None), **stats(outs),
            "lost": len(lost) + load.skipped, "lost_outside_outage": sum(o.status != 200 for o in safe),
            "client_skipped": load.skipped,
            "during_outage": stats(during) if during else {}, "readyz_while_down": sorted(set(map(str, readyz_down))),
            "ok": not reasons, "reasons": reasons}


def version_swap(stack: Stack, images, capacity: float, exports: Sequence[Callable[[], int]],
                 settle_limit: float = 180.0, tail: float = 3.0, load_factor: float = 0.25) -> dict:
    """Load at load_factor*c while each export publishes a new pair; waits until answers come from each new
    version. Loading a version starts new torch stubs on the same cores, so capacity dips meanwhile: at 0.5c on
    2 busy cores the backlog outgrew MAX_IN_FLIGHT=32 and 2% were shed (429), hence 0.25c by default and a
    roomy in-flight limit on the drills' gateway."""
    rate = max(0.5, load_factor * capacity)
    load = Load(stack.gateway_url, images)
    join = load.start(rate, settle_limit * len(exports) + 60)
    time.sleep(2.0)
    published, switch_s = [], []
    for export in exports:
        t0 = time.monotonic()
        v = export()
        published.append(v)
        while time.monotonic() - t0 < settle_limit:
            if any(o.status == 200 and o.purifier == str(v) and o.start > t0 for o in list(load.outcomes)):
                switch_s.append(round(time.monotonic() - t0, 2))
                break
            time.sleep(0.2)
        else:
            switch_s.append(None)
    time.sleep(tail)
    outs = join(stop_now=True)
    s = stats(outs)
    served = sorted({(o.purifier, o.classifier) for o in outs if o.status == 200})
    reasons = []
    if s["failed"] or load.skipped:
        reasons.append(f"{s['failed']} failed requests during the swaps: {s['by_status']}; "
                       f"{load.skipped} not sent (client bound)")
    if s["mixed_versions"]:
        reasons.append(f"{s['mixed_versions']} answers with a mixed purifier/classifier pair")
    if None in switch_s:
        reasons.append(f"new versions {published} not all served (switch times {switch_s})")
    return {"rate_rps": round(rate, 2), "published": published, "switch_after_export_s": switch_s,
            "shed": sum(o.status in SHED for o in outs), "client_skipped": load.skipped,
            "pairs_served": [f"{p}/{c}" for p, c in served], **s, "ok": not reasons, "reasons": reasons}


# ---- exports for the swap drill --------------------------------------------------------------------------

def republish(repo: Path, from_version: int) -> Callable[[], int]:
    """An export of the weights (and card) of an existing version dir as a new version: a real export run."""
    def run() -> int:
        from training import export
        src = {m: repo / m / str(from_version) for m in ("purifier", "classifier")}
        return export.export(src["purifier"] / "weights", src["classifier"] / "weights",
                             src["purifier"] / "robustness_card.json", repo)
    return run


# ---- CLI -------------------------------------------------------------------------------------------------

PLANS = {  # seconds per phase
    "short": {"calibrate": 6, "soak": 12, "overload": 8, "kill_before": 3, "kill_down": 4, "kill_after": 3},
    "long": {"calibrate": 20, "soak": 300, "overload": 60, "kill_before": 15, "kill_down": 20, "kill_after": 20},
}
DRILLS = ("soak", "overload", "triton_kill", "version_swap")
MAIN_IN_FLIGHT = 128


def run_drills(repo: Path, out: Path, plan: dict, only: Sequence[str] = DRILLS, overload_in_flight: int = 4,
               log: Callable[[str], None] = print) -> dict:
    render_pngs(out / "images", n=32)
    images = load_pngs(out / "images")
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "plan": plan, "repo": str(repo),
                    "machine": {"cpus": os.cpu_count(), "loadavg_1m_start": round(os.getloadavg()[0], 2)}}
    # the swap drill writes versions: work on a copy, never on the repository the caller passed
    work_repo = out / "model_repository"
    if work_repo.exists():
        shutil.rmtree(work_repo)
    shutil.copytree(repo, work_repo, ignore=shutil.ignore_patterns("__pycache__"))
    # the main gateway gets a roomy in-flight limit: soak, outage and swap measure the stack, not shedding
    # (the overload drill has its own gateway with a small limit)
    with Stack(work_repo, run_dir=out / "stack", gateway=GatewayConfig(max_in_flight=MAIN_IN_FLIGHT)) as stack:
        log(f"stack up: gateway {stack.gateway_url}, Triton {stack.triton.grpc_url}")
        report["calibrate"] = cal = calibrate(stack, images, plan["calibrate"])
        cap = max(cal["capacity_rps"], 0.5)
        log(f"capacity {cap:.2f} req/s (closed loop, 4 clients, p50 {cal['p50_s']} s)")
        if "soak" in only:
            report["soak"] = soak(stack, images, cap, plan["soak"])
            log(f"soak: {_verdict(report['soak'])}")
        if "overload" in only:
            # a second gateway on the same Triton with a small in-flight limit: 2x capacity must shed there
            small = stack.extra_gateway(GatewayConfig(max_in_flight=overload_in_flight))
            report["overload"] = overload(small, images, cap, plan["overload"], overload_in_flight)
            small.stop()
            log(f"overload: {_verdict(report['overload'])}")
        if "triton_kill" in only:
            report["triton_kill"] = triton_kill(stack, images, cap, plan["kill_before"], plan["kill_down"],
                                                plan["kill_after"])
            log(f"triton_kill: {_verdict(report['triton_kill'])}")
        if "version_swap" in only:
            versions = sorted(int(d.name) for d in (work_repo / "purifier").iterdir() if d.name.isdigit())
            legacy = [v for v in (versions[0], versions[-1]) if repository.check_version(
                repository.version_dir(work_repo, "purifier", v), "purifier")["gate_status"]["status"] == "legacy"]
            if legacy:  # export refuses a card that does not pass the policy, so there is nothing to re-publish
                report["version_swap"] = {"ok": True, "skipped": f"versions {legacy} are served as legacy: their "
                                          f"cards cannot be re-exported (run the drill on signed versions)"}
            else:
                # publish the oldest weights as a new version, then the newest again: a change and a prune each
                report["version_swap"] = version_swap(stack, images, cap, [republish(work_repo, versions[0]),
                                                                           republish(work_repo, versions[-1])])
            log(f"version_swap: {_verdict(report['version_swap'])}")
        report["rss_mib_end"] = {k: round(v / 2**20, 1) for k, v in stack.rss().items()}
    report["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    report["ok"] = all(report[d]["ok"] for d in DRILLS if d in report)
    (out / "drills.json").write_text(json.dumps(report, indent=2))
    return report


def _verdict(d: dict) -> str:
    keys = ("rate_rps", "requests", "failed", "p95_s", "shed", "lost", "mixed_versions", "rss_growth_after_warmup",
            "switch_after_export_s", "gateway_recovery_s")
    figs = ", ".join(f"{k}={d[k]}" for k in keys if k in d)
    return ("PASS " if d["ok"] else "FAIL ") + figs + ("" if d["ok"] else f" :: {'; '.join(d['reasons'])}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.drills", description=__doc__.split("\n\n")[0])
    p.add_argument("--long", action="store_true", help="minutes-long phases (soak 5 min)")
    p.add_argument("--only", nargs="+", choices=DRILLS, default=list(DRILLS))
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository", help="copied, never modified")
    p.add_argument("--out", type=Path, default=None, help="default runs/drills/<time>")
    p.add_argument("--soak-seconds", type=float, default=None, help="override the plan's soak length")
    a = p.parse_args(argv)
    if not all((a.repo / m / "config.pbtxt").exists() for m in ("purifier", "classifier")):
        p.error(f"--repo {a.repo} is not a model repository (no purifier/ and classifier/ configs)")
    plan = dict(PLANS["long" if a.long else "short"])
    if a.soak_seconds:
        plan["soak"] = a.soak_seconds
    out = a.out or ROOT / "runs" / "drills" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    report = run_drills(a.repo, out, plan, a.only)
    print(f"report: {out / 'drills.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
