"""Prometheus metrics of the gateway. The names are a contract (dashboard and alerts use them).

Each app gets its own CollectorRegistry, so several apps in one process (tests) do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

# Purification takes seconds on CPU; the sub-second buckets keep health checks and rejections visible.
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
VOTE_BUCKETS = (1, 2, 3, 4, 5, 8, 10, 16, 32)
AGREEMENT_BUCKETS = (.2, .3, .4, .5, .6, .7, .8, .9, .99, 1.0)
# why a /classify request took the two pinned calls (purifier/N, then classifier/N) instead of one ensemble call
# (service/app/triton/pool.py): the ensemble would not run the pair (a newer version of one model is loaded, or a step
# pins another version), is not loaded, does not report which versions answered, answered with other versions than
# the pair's, failed (ensemble_error), or refused the request as INVALID_ARGUMENT (rejected: usually the client's
# own mistake, e.g. a profile the version does not serve; not counted by the alert DbpGatewayClassifyFallbacks);
# the pinned calls then give the request its own answer or error
FALLBACK_REASONS = ("not_newest", "no_ensemble", "no_version_outputs", "version_mismatch", "ensemble_error",
                    "rejected")
CARD_ENDPOINTS = ("/classify", "/purify")  # the receipts that name the purifier's robustness card
ENDPOINTS = ("/classify", "/purify", "/certify", "/livez", "/readyz", "/metrics", "/", "/docs", "/openapi.json")


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # process_resident_memory_bytes, process_cpu_seconds_total...: the soak drill and the dashboard watch them
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("dbp_gateway_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.duration = Histogram("dbp_gateway_request_duration_seconds", "Gateway latency per request",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.triton_duration = Histogram("dbp_gateway_triton_duration_seconds",
                                         "Time spent in Triton calls per request", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("dbp_gateway_in_flight_requests", "/classify and /purify requests being served",
                               registry=r)
        self.rejections = Counter("dbp_gateway_rejections_total", "Requests refused, by reason", ["reason"],
                                  registry=r)
        self.images = Histogram("dbp_gateway_images_per_request", "Images per request", ["endpoint"],
                                buckets=IMAGE_BUCKETS, registry=r)
        self.votes = Histogram("dbp_gateway_votes", "Purifications per image (votes) of /classify requests",
                               buckets=VOTE_BUCKETS, registry=r)
        self.agreement = Histogram("dbp_gateway_agreement", "Share of votes for the answered label, per image "
                                   "of /classify requests with votes > 1", buckets=AGREEMENT_BUCKETS, registry=r)
        self.model_info = Gauge("dbp_gateway_model_info", "Model version pair served (1 = in use)",
                                ["model", "purifier_version", "classifier_version"], registry=r)
        self.backend_ready = Gauge("dbp_gateway_triton_backend_ready", "1 if the Triton URL is ready with a "
                                   "version pair, else 0", ["url"], registry=r)
        self.backend_requests = Counter("dbp_gateway_triton_requests_total", "Requests sent to each Triton URL, "
                                        "by outcome (ok, rejected, unavailable, timeout, error, refused)",
                                        ["url", "outcome"], registry=r)
        self.classify_fallbacks = Counter("dbp_gateway_classify_fallbacks_total", "/classify requests answered by "
                                          "the two pinned calls (purifier/N, classifier/N) instead of one call to the "
                                          "ensemble, by reason", ["reason"], registry=r)
        for reason in FALLBACK_REASONS:
            self.classify_fallbacks.labels(reason)  # every reason visible at 0
        self.card_mismatch = Counter("dbp_gateway_card_mismatch_total", "Receipts whose robustness card was withheld: "
                                     "the card the gateway read is not the one the server checked at load (changed "
                                     "on disk, or another mount), by endpoint", ["endpoint"], registry=r)
        for endpoint in CARD_ENDPOINTS:
            self.card_mismatch.labels(endpoint)
        self._pairs: set[tuple[str, str, str]] = set()

    def set_pairs(self, pairs: set[tuple[str, str, str]]) -> None:
        """Exactly the version pairs served now carry model_info = 1; pairs no longer served disappear."""
        for old in self._pairs - pairs:
            try:
                self.model_info.remove(*old)
            except KeyError:
                pass
        for p in pairs:
            self.model_info.labels(*p).set(1)
        self._pairs = set(pairs)


def endpoint_label(path: str) -> str:
    """A fixed label set: arbitrary URLs (scanners, typos) must not create new time series."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/static/") or path.startswith("/demo/"):
        return "/static"
    return "other"
