"""One pure-ASGI middleware in front of every route: metrics, backpressure and the body limit.

- Every request is counted and timed by endpoint and status; problem answers by their reason.
- /classify and /purify are bounded: past MAX_IN_FLIGHT concurrent requests the answer is an immediate
  429 with Retry-After, before the body is read (no unbounded queue in the gateway or towards Triton).
- Their bodies are read here, up to MAX_BODY_BYTES (Content-Length checked first), and replayed to the
  route; a larger body is a 413 without reading the rest.
"""
from __future__ import annotations

import time

from .config import Settings
from .errors import problem_response
from .metrics import GatewayMetrics, endpoint_label

LIMITED = ("/classify", "/purify", "/certify")


class GatewayMiddleware:
    def __init__(self, app, settings: Settings, metrics: GatewayMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = endpoint_label(path)
        t0 = time.perf_counter()
        state = {"status": 500, "reason": None}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                for k, v in message.get("headers", []):
                    if k.lower() == b"x-rejection-reason":
                        state["reason"] = v.decode("latin-1")
            await send(message)

        limited = path in LIMITED and scope.get("method") == "POST"
        try:
            if not limited:
                await self.app(scope, receive, send_wrapper)
                return
            if self.in_flight >= self.settings.MAX_IN_FLIGHT:
                await problem_response(429, "overload", f"{self.in_flight} requests in flight, the limit is "
                                       f"{self.settings.MAX_IN_FLIGHT}; retry later",
                                       {"Retry-After": str(self.settings.RETRY_AFTER_S)}, path)(
                    scope, receive, send_wrapper)
                return
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            try:
                body = await self._read_body(scope, receive)
                if body is None:
                    await problem_response(413, "body_too_large", f"request body exceeds the limit of "
                                           f"{self.settings.MAX_BODY_BYTES} bytes", None, path)(
                        scope, receive, send_wrapper)
                    return
                await self.app(scope, _replay(body, receive), send_wrapper)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
        finally:
            self.metrics.requests.labels(endpoint, str(state["status"])).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - t0)
            if state["reason"] and state["status"] >= 400:
                self.metrics.rejections.labels(state["reason"]).inc()

    async def _read_body(self, scope, receive):
        """The whole body, or None if it is larger than MAX_BODY_BYTES."""
        limit = self.settings.MAX_BODY_BYTES
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > limit:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real stream: http.disconnect when the client goes away
    return replay
