"""Async gRPC access to one or more Triton servers: one reused client per URL, a periodic readiness probe,
balancing over the ready ones, per-request deadlines and the mapping of Triton failures to HTTP answers.

A backend is *ready* when the server is ready and it serves a version pair (purifier N and classifier N
both READY) whose interface could be read. Requests go to the ready backend with the fewest requests in
flight; a backend that refuses a connection is marked unready at once and the request moves on to the
next one while its deadline allows. The probe brings backends back when they recover, so the gateway
serves again after a Triton restart without restarting itself.

/classify is one call to the ensemble when it runs the pinned pair (the probe checks the repository index:
one_call_blocker), and every row of its answer must say so (PURIFIER_VERSION and CLASSIFIER_VERSION = N);
otherwise, or if the ensemble fails, the request takes the two pinned calls, purifier/N then classifier/N, and
dbp_gateway_classify_fallbacks_total counts it by reason ("rejected": the ensemble refused the request as
INVALID_ARGUMENT, usually the client's own fault, which the pinned calls then report precisely). Either way the
answer comes from the pair whose card the receipt names.

Both paths also ask for the sha256 of the card the purifier checked at load (CARD_SHA256, the ensemble's
PURIFIER_CARD_SHA256) when the model declares it, and hand it over per row (Outcome.card_sha256) so the receipt shows a
card's figures only if they are of that card (service/app/cards.py bind_summary).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from ..core.config import Settings
from ..core.errors import ApiError
from ..core.metrics import GatewayMetrics
from .models import (AGREEMENT, CARD_SHA256, CERTIFY_OUTPUTS, CLASSIFIER_VERSION, IMAGES, LABEL, PROBS, PURIFIED,
                     PURIFIER_CARD_SHA256, PURIFIER_VERSION, SEED, VERSION, VOTES, CertifyInfo, InterfaceError,
                     PairInfo, certify_info, newest_pair, newest_ready, one_call_blocker, pair_info, ready_state)

log = logging.getLogger("service.triton")
MAX_MESSAGE = 2**31 - 1


def channel_args() -> list[tuple[str, Any]]:
    # gRPC's default reconnect backoff grows to 120 s: a restarted Triton would be ignored for minutes.
    return [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000)]


@dataclass
class Backend:
    url: str
    client: Any = None
    ready: bool = False
    reason: str = "not probed yet"
    pair: Optional[PairInfo] = None
    ensemble_ready: bool = False
    one_call: str = "not probed yet"  # "": /classify may be one ensemble call; else why not (FALLBACK_REASONS)
    certify: Optional[CertifyInfo] = None  # the certify model, when loaded (optional: the backend is ready without)
    certify_reason: str = "not probed yet"
    in_flight: int = 0
    checked_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Outcome:
    pair: PairInfo
    url: str
    outputs: dict[str, np.ndarray]
    triton_s: float
    certify: Optional[CertifyInfo] = None
    # per row, the sha256 of the card the purifier checked at load; None: the model does not report it (unchecked)
    card_sha256: Optional[list[str]] = None


class TritonAnswerError(ApiError):
    """Triton answered, but not what the pinned pair must answer (rows of another version): the request reached
    Triton, so its backend outcome is "error", not "refused"."""


def _status(e: InferenceServerException) -> str:
    return str(e.status() or "")


def _card_rows(out: dict, name: str, requested: bool) -> Optional[list[str]]:
    """Per row, the card sha256 the model answered as `name`; None only when it was not requested (the model does
    not declare it: unchecked). Requested but not answered gives [] (a mismatch, figures withheld): a model that
    declares the output and does not answer it must not pass for one that never reported a card."""
    a = out.pop(name, None)
    if not requested:
        return None
    if a is None:
        return []
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in np.asarray(a).reshape(-1)]


class TritonPool:
    def __init__(self, settings: Settings, metrics: GatewayMetrics):
        self.settings = settings
        self.metrics = metrics
        self.backends = [Backend(url) for url in settings.TRITON_URLS]
        self._rr = itertools.count()
        self._probe_task: Optional[asyncio.Task] = None
        self._tasks: set[asyncio.Task] = set()
        for b in self.backends:
            metrics.backend_ready.labels(b.url).set(0)

    # ---- life cycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        for b in self.backends:
            b.client = grpcclient.InferenceServerClient(b.url, channel_args=channel_args())
        await self.probe_all()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="triton-probe")

    async def close(self) -> None:
        if self._probe_task:
            self._probe_task.cancel()
            try:
                await self._probe_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        for b in self.backends:
            if b.client is not None:
                await b.client.close()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.PROBE_INTERVAL_S)
            try:
                await self.probe_all()
            except Exception:  # noqa: BLE001 - the probe must never die
                log.exception("readiness probe failed")

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(b) for b in self.backends))
        pairs = {(self.settings.ENSEMBLE_MODEL, str(b.pair.version), str(b.pair.version))
                 for b in self.backends if b.ready and b.pair}
        self.metrics.set_pairs(pairs)

    async def probe(self, b: Backend) -> None:
        async with b.lock:
            ready, reason, pair, ens, one = False, "", None, False, "not probed yet"
            try:
                pair, ens, one = await asyncio.wait_for(self._read_pair(b), self.settings.PROBE_TIMEOUT_S)
                ready, reason = pair is not None, "ok" if pair is not None else self._no_pair_reason
            except asyncio.TimeoutError:
                reason = f"no answer within {self.settings.PROBE_TIMEOUT_S:g} s"
            except InferenceServerException as e:
                reason = f"{_status(e) or 'error'}: {e.message()}"
            except InterfaceError as e:
                reason = str(e)
            except Exception as e:  # noqa: BLE001 - any failure means "not ready", with its reason
                reason = f"{type(e).__name__}: {e}"
            if ready != b.ready:
                log.log(logging.INFO if ready else logging.WARNING, "Triton %s is now %s (%s)", b.url,
                        "ready" if ready else "NOT ready", reason)
            if ready and one != b.one_call:
                log.info("Triton %s: /classify %s", b.url, "in one ensemble call" if not one else
                         f"in two pinned calls ({one})")
            b.ready, b.reason, b.pair, b.ensemble_ready, b.one_call = ready, reason, pair, ens, one
            if ready:
                b.certify, b.certify_reason = await self._read_certify(b)
            else:
                b.certify, b.certify_reason = None, reason
            b.checked_at = time.monotonic()
            self.metrics.backend_ready.labels(b.url).set(1 if ready else 0)

    _no_pair_reason = "no version N with both purifier N and classifier N READY"

    async def _read_pair(self, b: Backend) -> tuple[Optional[PairInfo], bool, str]:
        s, c = self.settings, b.client
        if not await c.is_server_live():  # not is_server_ready: strict readiness is false while a new version loads
            raise InterfaceError("Triton server is not live")
        index = (await c.get_model_repository_index(as_json=True)).get("models", [])
        ens = ready_state(index, s.ENSEMBLE_MODEL)
        n = newest_pair(index, s.PURIFIER_MODEL, s.CLASSIFIER_MODEL)
        if n is None:
            return None, ens, "no pair"
        v = str(n)
        pc, cc, ec, pm, cm = await asyncio.gather(
            c.get_model_config(s.PURIFIER_MODEL, v, as_json=True),
            c.get_model_config(s.CLASSIFIER_MODEL, v, as_json=True),
            c.get_model_config(s.ENSEMBLE_MODEL, as_json=True),
            c.get_model_metadata(s.PURIFIER_MODEL, v, as_json=True),
            c.get_model_metadata(s.CLASSIFIER_MODEL, v, as_json=True))
        one = one_call_blocker(index, s.ENSEMBLE_MODEL, ec["config"], s.PURIFIER_MODEL, s.CLASSIFIER_MODEL, n)
        return pair_info(n, pc["config"], cc["config"], ec["config"], pm, cm), ens, one

    async def _read_certify(self, b: Backend) -> tuple[Optional[CertifyInfo], str]:
        """The certify model's limits, or None and why (absent, not loaded, or describing itself badly); never
        makes the backend unready: /certify alone answers 503 then."""
        s, c = self.settings, b.client
        try:
            index = (await asyncio.wait_for(c.get_model_repository_index(as_json=True),
                                            self.settings.PROBE_TIMEOUT_S)).get("models", [])
            v = newest_ready(index, s.CERTIFY_MODEL)
            if v is None:
                states = [f"v{m.get('version')} {m.get('state')}: {m.get('reason') or ''}".strip()
                          for m in index if m.get("name") == s.CERTIFY_MODEL]
                return None, (f"model {s.CERTIFY_MODEL!r} is not loaded" +
                              (f" ({'; '.join(states)})" if states else " (not in Triton's repository)"))
            cfg, meta = await asyncio.wait_for(asyncio.gather(
                c.get_model_config(s.CERTIFY_MODEL, str(v), as_json=True),
                c.get_model_metadata(s.CERTIFY_MODEL, str(v), as_json=True)), self.settings.PROBE_TIMEOUT_S)
            return certify_info(v, cfg["config"], meta), "ok"
        except asyncio.TimeoutError:
            return None, f"no answer within {self.settings.PROBE_TIMEOUT_S:g} s"
        except InferenceServerException as e:
            return None, f"{_status(e) or 'error'}: {e.message()}"
        except Exception as e:  # noqa: BLE001 - any failure means "no certify model here", with its reason
            return None, f"{type(e).__name__}: {e}"

    def any_certify(self) -> Optional[CertifyInfo]:
        infos = [b.certify for b in self.ready_backends() if b.certify is not None]
        return max(infos, key=lambda i: i.version) if infos else None

    def certify_unavailable(self) -> ApiError:
        why = "; ".join(f"{b.url}: {b.certify_reason}" for b in self.backends)
        return self.unavailable(f"no Triton backend serves the certify model {self.settings.CERTIFY_MODEL!r} "
                                f"({why}); /classify and /purify are not affected")

    # ---- state for /readyz ----------------------------------------------------------------------------
    def ready_backends(self) -> list[Backend]:
        return [b for b in self.backends if b.ready and b.pair is not None]

    def any_pair(self) -> Optional[PairInfo]:
        ready = self.ready_backends()
        return max((b.pair for b in ready), key=lambda p: p.version) if ready else None

    def unavailable(self, detail: str) -> ApiError:
        return ApiError(503, "triton_unavailable", detail, {"Retry-After": str(self.settings.RETRY_AFTER_S)})

    def _order(self, certify: bool = False) -> list[Backend]:
        ready = [b for b in self.ready_backends() if b.certify is not None or not certify]
        if certify and not ready:
            raise self.certify_unavailable()
        if not ready:
            reasons = "; ".join(f"{b.url}: {b.reason}" for b in self.backends)
            raise self.unavailable(f"no Triton backend is ready ({reasons})")
        start = next(self._rr)
        rotated = ready[start % len(ready):] + ready[:start % len(ready)]
        return sorted(rotated, key=lambda b: b.in_flight)  # stable: round robin among equally loaded

    # ---- inference ------------------------------------------------------------------------------------
    def _input(self, pair: PairInfo | CertifyInfo, name: str, value: np.ndarray) -> InferInput:
        dt = pair.dtypes.get(name)
        if dt is None:
            raise ApiError(503, "triton_unavailable", f"the deployed model has no input {name}",
                           {"Retry-After": str(self.settings.RETRY_AFTER_S)})
        arr = np.ascontiguousarray(value, dtype=triton_to_np_dtype(dt))
        t = InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        return t

    async def _call(self, b: Backend, model: str, version: Optional[int], inputs: list, outputs: Sequence[str],
                    deadline: float) -> dict[str, np.ndarray]:
        """One inference; version None: the model's own choice (the ensemble's only version)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        res = await b.client.infer(model, inputs, model_version="" if version is None else str(version),
                                   outputs=[InferRequestedOutput(o) for o in outputs], client_timeout=remaining)
        return {o: res.as_numpy(o) for o in outputs}

    async def _pinned(self, b: Backend, model: str, pair: PairInfo, role: str, inputs: list,
                      outputs: Sequence[str], deadline: float) -> dict[str, np.ndarray]:
        """A call to model/N of the pair; its VERSION, when the model answers one, must be N on every row."""
        checked = role in pair.versioned
        out = await self._call(b, model, pair.version, inputs, list(outputs) + ([VERSION] if checked else []),
                               deadline)
        if checked:
            v = out.pop(VERSION)
            if not np.all(v == pair.version):
                raise TritonAnswerError(502, "triton_error", f"{model}/{pair.version} answered with rows of version(s) "
                               f"{sorted(set(np.asarray(v).reshape(-1).tolist()))}")
        return out

    async def _one_call(self, b: Backend, pair: PairInfo, inputs: list, rows: int,
                        deadline: float) -> tuple[Optional[dict[str, np.ndarray]], str]:
        """/classify as one call to the ensemble: (its outputs, "") if every row came from the pinned pair, else
        (None, why not). A timeout is the request's (504); any other failure leaves it to the pinned calls, whose
        answer, or error, is the pair's own."""
        card = [PURIFIER_CARD_SHA256] if "ensemble" in pair.card_reported else []
        try:
            out = await self._call(b, self.settings.ENSEMBLE_MODEL, None, inputs,
                                   [PROBS, LABEL, AGREEMENT, PURIFIER_VERSION, CLASSIFIER_VERSION] + card, deadline)
        except InferenceServerException as e:
            status, msg = _status(e), e.message() or str(e)
            if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in msg:
                raise
            # INVALID_ARGUMENT is most often the request's own fault (a declared profile the version refuses to
            # serve: "has no valid card", a bad input), or an older ensemble without the PROFILE input: the pinned
            # calls then give the precise answer or error. Counted as "rejected", which the fallback alert ignores
            # (clients' mistakes must not page); anything else is the ensemble's own failure.
            why = "rejected" if "INVALID_ARGUMENT" in status else "ensemble_error"
            log.info("ensemble call on %s failed (%s: %s); falling back to the pinned calls", b.url, status, msg)
            return None, why
        pv, cv = out.pop(PURIFIER_VERSION), out.pop(CLASSIFIER_VERSION)
        if pv.size != rows or cv.size != rows or np.any(pv != pair.version) or np.any(cv != pair.version):
            log.warning("the ensemble on %s answered with purifier %s / classifier %s, not the pinned pair %d: "
                        "falling back to the pinned calls", b.url, sorted(set(pv.reshape(-1).tolist())),
                        sorted(set(cv.reshape(-1).tolist())), pair.version)
            return None, "version_mismatch"
        return out, ""

    async def run(self, kind: str, build, deadline: float) -> Outcome:
        """Run `kind` ("classify" or "purify") on the best ready backend, moving on to the next one if a
        backend turns out to be gone. `build(pair)` returns (purifier inputs dict, votes) for that pair."""
        last: Optional[ApiError] = None
        for b in self._order(certify=kind == "certify"):
            pair, cert = b.pair, b.certify
            if pair is None or not b.ready or (kind == "certify" and cert is None):
                continue
            b.in_flight += 1
            t0 = time.monotonic()
            outcome = "error"
            try:
                if kind == "certify":  # build(pair, certify info) -> the certify model's inputs
                    feeds = build(pair, cert)
                    inputs = [self._input(cert, k, v) for k, v in feeds.items()]
                    out = await self._call(b, self.settings.CERTIFY_MODEL, cert.version, inputs, CERTIFY_OUTPUTS,
                                           deadline)
                    outcome = "ok"
                    return Outcome(pair, b.url, out, time.monotonic() - t0, cert)
                feeds, votes = build(pair)
                inputs = [self._input(pair, k, v) for k, v in feeds.items()]
                if kind == "classify" and self.settings.ONE_CALL:
                    why = b.one_call
                    if not why:
                        one, why = await self._one_call(b, pair, inputs, len(feeds[IMAGES]), deadline)
                        if one is not None:
                            outcome = "ok"
                            return Outcome(pair, b.url, one, time.monotonic() - t0,
                                           card_sha256=_card_rows(one, PURIFIER_CARD_SHA256,
                                                                  "ensemble" in pair.card_reported))
                    self.metrics.classify_fallbacks.labels(why).inc()
                card = [CARD_SHA256] if "purifier" in pair.card_reported else []
                out = await self._pinned(b, self.settings.PURIFIER_MODEL, pair, "purifier", inputs,
                                         [PURIFIED] + card, deadline)
                card_rows = _card_rows(out, CARD_SHA256, bool(card))
                if kind == "classify":
                    cin = [self._input(pair, IMAGES, out[PURIFIED])]
                    if votes > 1:
                        cin.append(self._input(pair, VOTES, np.full((out[PURIFIED].shape[0], 1), votes)))
                    out.update(await self._pinned(b, self.settings.CLASSIFIER_MODEL, pair, "classifier", cin,
                                                  [PROBS, LABEL, AGREEMENT], deadline))
                outcome = "ok"
                return Outcome(pair, b.url, out, time.monotonic() - t0, card_sha256=card_rows)
            except asyncio.TimeoutError:
                outcome = "timeout"
                raise ApiError(504, "timeout", f"Triton did not answer within the request timeout of "
                               f"{self.settings.REQUEST_TIMEOUT_S:g} s") from None
            except InferenceServerException as e:
                status, msg = _status(e), e.message() or str(e)
                if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in msg:
                    outcome = "timeout"
                    raise ApiError(504, "timeout", f"Triton did not answer within the request timeout of "
                                   f"{self.settings.REQUEST_TIMEOUT_S:g} s") from None
                if "INVALID_ARGUMENT" in status and "has no valid card" in msg:
                    # a declared serving profile the served version refused to serve (its card is missing or
                    # does not pass: dbp.serving.services.PurifierService), the request's own fault: 422
                    outcome = "rejected"
                    raise ApiError(422, "profile_not_served", msg) from None
                if "INVALID_ARGUMENT" in status:
                    outcome = "rejected"
                    raise ApiError(400, "triton_rejected", f"Triton rejected the input: {msg}") from None
                if kind == "certify" and "UNAVAILABLE" not in status and (
                        "NOT_FOUND" in status or "unknown model" in msg):
                    # the certify version went away (unloaded): that backend's pair is still served
                    outcome = "unavailable"
                    b.certify, b.certify_reason = None, f"{status}: {msg}"
                    last = self.certify_unavailable()
                    continue
                if "UNAVAILABLE" in status or "NOT_FOUND" in status or "unknown model" in msg:
                    # gone, or the pinned version was unloaded (rollback): re-probe, try the next backend
                    outcome = "unavailable"
                    b.ready, b.reason = False, f"{status}: {msg}"
                    self.metrics.backend_ready.labels(b.url).set(0)
                    task = asyncio.get_running_loop().create_task(self.probe(b))
                    self._tasks.add(task)  # keep a reference until it is done
                    task.add_done_callback(self._tasks.discard)
                    last = self.unavailable(f"Triton at {b.url} became unavailable: {msg}")
                    continue
                raise ApiError(502, "triton_error", f"Triton failed on the request: {msg}") from None
            except TritonAnswerError:
                outcome = "error"  # it reached Triton, whose answer was wrong
                raise
            except ApiError:
                outcome = "refused"  # the request did not fit this pair (votes, images): nothing reached Triton
                raise
            finally:
                b.in_flight -= 1
                self.metrics.backend_requests.labels(b.url, outcome).inc()
        raise last or self.unavailable("no Triton backend is ready")
