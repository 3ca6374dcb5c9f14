"""The noise seed Triton gets: keyed by a server secret, so a client's seed cannot be turned into noise offline.

A client seed s picks the noise of image i as seed(i) = HMAC-SHA256(secret, s + i, the image's tensor),
cut to Triton's SEED range. Why each part:
- the secret: the weights are public, so a raw seed would let anyone compute the noise of seed s and craft a
  DW-box example for it offline, then submit it with `seed=s` (the fixed-noise robustness, not the served
  fresh-noise one). Without the secret the derived seed cannot be predicted.
- the image tensor: /purify returns the purified image, and with the public weights the noise behind it could
  be fitted (DDIM is deterministic once the noise is drawn). Were the noise a function of the seed alone,
  one query might reveal it and the attack above would work online. Bound to the exact tensor,
  any change of the image (an adversarial perturbation) draws unrelated noise, so a fixed seed neither
  fixes the noise of a crafted image nor makes the model a fixed smooth function for query attacks.
- s + i: image i of a request answers as if sent alone with seed s + i (the seed the answer reports), so
  one image of a batch can be reproduced by itself; HMAC makes neighbouring seeds' noise unrelated.
The same seed and image therefore give the same answer on one deployment (support, reproducibility);
another secret gives other noise.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Optional

import numpy as np

from ..schemas import SEED_MAX  # Triton's SEED is INT64; the gateway keeps to its non-negative half
from .config import ENV_PREFIX, Settings
# a fixed prefix: a key reused for anything else (it should not be) cannot produce these MACs by accident
DOMAIN = b"dbp-gateway/noise-seed/v1\0"

log = logging.getLogger("service")


def image_digest(array: np.ndarray) -> bytes:
    """SHA-256 of the exact tensor the model gets (dtype, shape and values)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.digest()


def derive_seed(key: bytes, client_seed: int, digest: bytes) -> int:
    """HMAC-SHA256(key, client seed, image digest) -> [0, SEED_MAX]."""
    if not 0 <= client_seed <= SEED_MAX:
        raise ValueError(f"client seed {client_seed} is outside [0, {SEED_MAX}]")
    mac = hmac.new(key, DOMAIN + client_seed.to_bytes(8, "big") + digest, hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") >> 1  # 63 uniform bits: always a valid non-negative INT64


class SeedPolicy:
    """The key and whether clients may choose seeds. The key never leaves this object: no repr, no log."""

    def __init__(self, secret: Optional[str], allow_client_seed: bool):
        self.allow_client_seed = allow_client_seed
        self.generated = secret is None
        self._key = secrets.token_bytes(32) if secret is None else secret.encode("utf-8")

    def __repr__(self) -> str:
        return f"SeedPolicy(key={'generated' if self.generated else 'from settings'}, " \
               f"allow_client_seed={self.allow_client_seed})"

    def seeds(self, client_seed: Optional[int], arrays: list[np.ndarray]) -> tuple[list[int], list[int]]:
        """(seeds to report, seeds to send to Triton), one per image. Without a client seed one is drawn,
        so the answer still reports a seed that reproduces it."""
        base = secrets.randbits(63) if client_seed is None else client_seed
        reported = [(base + i) % (SEED_MAX + 1) for i in range(len(arrays))]
        return reported, [derive_seed(self._key, s, image_digest(a)) for s, a in zip(reported, arrays)]


def policy_from_settings(settings: Settings) -> SeedPolicy:
    secret = settings.SEED_SECRET.get_secret_value() if settings.SEED_SECRET is not None else None
    policy = SeedPolicy(secret, settings.ALLOW_CLIENT_SEED)
    if policy.generated:
        log.warning("%sSEED_SECRET is not set: this process generated its own noise key, so a client seed "
                    "gives other noise after a restart and on other replicas (give them all one secret)", ENV_PREFIX)
    return policy
