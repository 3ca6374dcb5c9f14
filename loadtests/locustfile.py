"""Locust users for the gateway: classify, purify and a mixed workload, uploading real Fashion-MNIST PNGs.

Run through `python -m loadtests.run` (starts a local stack, bounds users and time, writes the reports), or
by hand against a running gateway:

  DBP_LOADTEST_IMAGES=<folder of PNGs> locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 60s \
      --host http://127.0.0.1:8080 MixedUser

Every answer is checked, not only its status: the predictions must match the images sent, and the purifier
and classifier versions a /classify answer reports must be one pair (a mixed pair is counted as a failure).
Settings by environment: DBP_LOADTEST_RATE (requests/s per user; default: closed loop, no think time),
DBP_LOADTEST_API_KEY (sent as X-API-Key).
"""
from __future__ import annotations

import os
import random

from locust import HttpUser, constant, constant_throughput, task

from loadtests.images import UPLOAD_FIELD, is_png, load_pngs

IMAGES = load_pngs()
RATE = float(os.environ.get("DBP_LOADTEST_RATE", "0") or 0)
HEADERS = {"X-API-Key": os.environ["DBP_LOADTEST_API_KEY"]} if os.environ.get("DBP_LOADTEST_API_KEY") else {}


def _files(n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(UPLOAD_FIELD, (name, data, "image/png")) for name, data in random.sample(IMAGES, n)]


class _GatewayUser(HttpUser):
    abstract = True
    wait_time = constant_throughput(RATE) if RATE > 0 else constant(0)

    def classify(self, n: int = 1, votes: int = 1) -> None:
        params = {"votes": votes} if votes > 1 else None
        name = f"/classify n={n}" + (f" votes={votes}" if votes > 1 else "")
        with self.client.post("/classify", files=_files(n), params=params, headers=HEADERS, name=name,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                body = r.json()
                preds, model = body["predictions"], body["model"]
            except (ValueError, KeyError, TypeError) as e:
                r.failure(f"unexpected body: {e}")
                return
            pv, cv = r.headers.get("X-Purifier-Version"), r.headers.get("X-Classifier-Version")
            if len(preds) != n:
                r.failure(f"{len(preds)} predictions for {n} images")
            elif pv is None or pv != cv or str(model.get("purifier_version")) != pv \
                    or str(model.get("classifier_version")) != cv:
                r.failure(f"mixed version pair: headers purifier {pv} classifier {cv}, body {model}")
            elif votes > 1 and any(p.get("agreement") is None for p in preds):
                r.failure("votes > 1 but no agreement")
            else:
                r.success()

    def purify(self) -> None:
        with self.client.post("/purify", files=_files(1), headers=HEADERS, name="/purify",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif not (r.headers.get("Content-Type", "").startswith("image/png") and is_png(r.content)):
                r.failure(f"not a PNG: {r.headers.get('Content-Type')}")
            else:
                r.success()


class ClassifyUser(_GatewayUser):
    @task
    def one_image(self) -> None:
        self.classify(1)


class PurifyUser(_GatewayUser):
    @task
    def one_image(self) -> None:
        self.purify()


class MixedUser(_GatewayUser):
    """What the demo page and API clients send: mostly single images, some batches, some votes, some purify."""

    @task(6)
    def classify_one(self) -> None:
        self.classify(1)

    @task(1)
    def classify_batch(self) -> None:
        self.classify(4)

    @task(1)
    def classify_votes(self) -> None:
        self.classify(1, votes=3)

    @task(2)
    def purify_one(self) -> None:
        self.purify()

