"""benchmarks/bench_gateway.py decides "/classify in one ensemble call" from Triton's statistics of the
purify_classify ensemble, not from the gateway's own fallback counters (which read 0 with DBP_GATEWAY_ONE_CALL=false
or an unreadable /metrics): the count must grow by the direct requests plus one per gateway request."""
from __future__ import annotations

import pytest

from helpers import free_ports


def test_one_call_verdict_from_the_ensemble_count():
    from benchmarks.bench_gateway import one_call_verdict
    assert one_call_verdict(100, 180, direct=40, gateway=40) is True
    assert one_call_verdict(100, 140, direct=40, gateway=40) is False  # one_call=false: only the direct requests
    assert one_call_verdict(100, 150, direct=40, gateway=40) is False  # some fell back
    assert one_call_verdict(None, 180, direct=40, gateway=40) == "unknown"
    assert one_call_verdict(100, None, direct=40, gateway=40) == "unknown"
    assert one_call_verdict(100, 200, direct=40, gateway=40) == "unknown"  # someone else used the ensemble


def test_unreadable_statistics_and_metrics_are_none_not_zero():
    from benchmarks.bench_gateway import ensemble_requests, gateway_fallbacks
    port = free_ports(1)[0]  # nothing listens there
    assert ensemble_requests(f"127.0.0.1:{port}") is None
    assert gateway_fallbacks(f"http://127.0.0.1:{port}") is None


@pytest.mark.parametrize("body", ['{"model_stats": [{"inference_stats": {"success": {"count": 7}}}]}'])
def test_ensemble_requests_reads_the_success_count(body, monkeypatch):
    import httpx

    from benchmarks import bench_gateway
    transport = httpx.MockTransport(lambda req: httpx.Response(200, text=body) if
                                    req.url.path == "/v2/models/purify_classify/stats" else httpx.Response(404))
    monkeypatch.setattr(bench_gateway.httpx, "get", lambda url, **kw: httpx.Client(transport=transport).get(url, **kw))
    assert bench_gateway.ensemble_requests("t:8000") == 7
