"""The torch side of the Triton python models: load a version, run dynamic batches of requests.

Kept free of Triton (pb_utils glue: dbp.serving.triton_glue) so it is tested in-process. Requests are
validated with dbp.serving.contract; the valid ones of a dynamic batch are gathered into one torch call
and the result split back, one answer per request.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import repository
from ..diffusion import CONTINUOUS_TIME_SAMPLERS, PurifyNoise
from ..models import Purifier, load_classifier, load_unet
from .contract import (DEFAULT_PROFILE, CertifySettings, ClassifierSettings, Inputs, PurifierSettings, RequestError,
                       aggregate_votes, certify_request, check_images, check_profile, check_seeds, check_votes,
                       images_and_batch, serve_batch)


@dataclass
class Version:
    dir: Path
    weights: Path
    meta: dict
    card: Optional[dict]


def load_version(version_dir: str | Path, role: str, require_card: bool = True,
                 purification: Optional[dict] = None) -> Version:
    """Read <version>/weights (a dbp checkpoint dir) and the card beside it (dbp.repository.check_version).

    `purification`: the settings this server runs (config.pbtxt); a card measured with others is refused."""
    version_dir = Path(version_dir)
    weights = version_dir / repository.WEIGHTS_DIR
    meta = ckpt.load_meta(weights)
    card = repository.check_version(version_dir, role, purification) if require_card else None
    status = (card or {}).get("gate_status") or {}
    if status.get("status") == "legacy":
        print(f"WARNING: serving {version_dir} as a LEGACY version (approved by {status.get('approver')} until "
              f"{status.get('expires')}): its card fails {'; '.join(status.get('failed_rules') or [])}",
              file=sys.stderr, flush=True)
    return Version(version_dir, weights, meta, card)


def _chunked(fn: Callable, x, max_rows: int):
    if x.shape[0] <= max_rows:
        return fn(x)
    return torch.cat([fn(x[i:i + max_rows]) for i in range(0, x.shape[0], max_rows)])


def _set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


@dataclass
class PurifyItem:
    x: Any  # torch [B, C, H, W]
    k: int
    seeds: Optional[list[int]]
    profile: str = DEFAULT_PROFILE


class PurifierService:
    """Loads a purifier version and runs dynamic batches of purification requests.

    Serving profiles (config.pbtxt `profiles`, dbp.serving.contract.Profile): "default" is the top-level settings and
    its card must pass (else the version does not load); every other declared profile gets its own Purifier over
    the same eps-network (the same engine) and is served only if its card (<version>/cards/<profile>.json) passes
    dbp.repository.check_version for that profile's settings; `refused` says why the others are not served.

    Exception to the shared engine: a profile whose sampler calls the network at continuous time (vpsde, edm) runs
    on the torch network when the engine's graph takes only integer timesteps (engine files exported before float
    t), since the engine would refuse those calls and the card measured torch's; `profile_engines` says which
    evaluator each profile uses.
    """

    def __init__(self, version_dir: str | Path, settings: PurifierSettings = PurifierSettings(),
                 require_card: bool = True):
        _set_threads(settings.threads)
        self.settings = settings
        # what each profile's card must be bound to and have attacked (its settings and the served max_votes)
        self.version = load_version(version_dir, "purifier", require_card,
                                    repository.served_purification(settings, DEFAULT_PROFILE))
        eps_torch = eps = load_unet(self.version.weights)
        cfg = eps.unet.config
        self.chw = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
        self.engine_parity = None  # max |eps_engine - eps_torch| re-measured at load (dbp.serving.engines)
        if settings.engine != "torch":  # the engine evaluates the UNet; the chain stays dbp.diffusion's
            from .engines import load_engine
            eps, self.engine_parity = load_engine(settings.engine, self.version.dir, self.version.card, eps,
                                                  settings.threads)
        table = settings.profile_table()
        # profile -> (what evaluates its UNet, why not the configured engine or None)
        evaluator: dict[str, tuple[str, Optional[str]]] = {}
        nets = {}
        for name, p in table.items():
            evaluator[name], nets[name] = (settings.engine, None), eps
            if eps is not eps_torch and p.sampler in CONTINUOUS_TIME_SAMPLERS and not eps.continuous_time:
                evaluator[name] = ("torch", f"the engine's graph takes integer timesteps; sampler {p.sampler} "
                                            f"needs continuous time")
                nets[name] = eps_torch
        # every declared profile's settings are checked by dbp.diffusion (Purifier -> Diffusion.check_settings), so a
        # bad one fails the load whether or not its card exists
        chains = {name: Purifier(nets[name], t_star=p.t_star, sampler=p.sampler,
                                 num_inference_steps=p.num_inference_steps).eval() for name, p in table.items()}
        self.purifier = chains[DEFAULT_PROFILE]
        self.purifiers: dict[str, Purifier] = {DEFAULT_PROFILE: self.purifier}
        self.profile_cards: dict[str, Optional[dict]] = {DEFAULT_PROFILE: self.version.card}
        self.refused: dict[str, str] = {}  # declared profile -> why this version does not serve it
        for name, p in table.items():
            if name == DEFAULT_PROFILE:
                continue
            if require_card:
                try:
                    card = repository.check_version(self.version.dir, "purifier",
                                                      repository.served_purification(settings, name), profile=name)
                except repository.RepositoryError as e:
                    self.refused[name] = str(e)
                    print(f"WARNING: {self.version.dir}: not serving profile {name!r}: {e}", file=sys.stderr,
                          flush=True)
                    continue
            else:
                card = None
            self.purifiers[name] = chains[name]
            self.profile_cards[name] = card
        self.profile_engines = {name: evaluator[name][0] for name in self.purifiers}
        for name in self.purifiers:
            if evaluator[name][1]:
                print(f"{self.version.dir}: profile {name}: {evaluator[name][0]} ({evaluator[name][1]})",
                      file=sys.stderr, flush=True)
        # served profile -> sha256 of the card bytes checked above ("" without a card check): what CARD_SHA256
        # answers, never a re-read of a file that may have changed since (dbp.serving.triton_glue.with_card_sha256)
        self.card_sha256 = {name: ((card or {}).get("gate_status") or {}).get("card_sha256") or ""
                            for name, card in self.profile_cards.items()}
        # unseeded rows draw from one instance generator, seeded from the OS
        self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    def prepare(self, r: Inputs) -> PurifyItem:
        x, batch = images_and_batch(r)
        k = check_votes(r.get("VOTES"), batch, self.settings.max_votes)
        profile = check_profile(r.get("PROFILE"), batch, list(self.purifiers) + list(self.refused))
        if profile in self.refused:
            raise RequestError(f"profile {profile!r} has no valid card in purifier version {self.version.dir.name}, "
                               f"so it is not served: {self.refused[profile]}")
        x = check_images(x, self.chw, 1, self.settings.range_tolerance)
        return PurifyItem(torch.from_numpy(x), k, check_seeds(r.get("SEED"), batch), profile)

    def noise_for(self, item: PurifyItem):
        """Each image's k purifications draw from its own generator when seeded, so a row's noise does not
        depend on the other images in the request or the dynamic batch."""
        parts = []
        purifier = self.purifiers[item.profile]
        for b in range(item.x.shape[0]):
            gen = self.generator if item.seeds is None else torch.Generator().manual_seed(item.seeds[b])
            parts.append(purifier.sample_noise(item.x[b:b + 1].expand(item.k, -1, -1, -1), gen))
        return PurifyNoise.cat(parts)

    def run(self, items: list[PurifyItem]) -> list[dict[str, np.ndarray] | Exception]:
        """One torch pass per profile present in the batch (its own chain); a failing group answers its own
        requests with the error, the other groups are unaffected."""
        res: list[Any] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.profile, []).append(i)
        for profile, idx in groups.items():
            try:
                outs = self._run_group(self.purifiers[profile], [items[i] for i in idx])
            except Exception as e:  # noqa: BLE001 - one group's failure must not fail the others
                outs = [RuntimeError(f"inference failed: {type(e).__name__}: {e}")] * len(idx)
            for i, o in zip(idx, outs):
                res[i] = o
        return res

    def _run_group(self, purifier: Purifier, items: list[PurifyItem]) -> list[dict[str, np.ndarray]]:
        with torch.inference_mode():
            noise = PurifyNoise.cat([self.noise_for(it) for it in items])
            x = torch.cat([it.x.repeat_interleave(it.k, dim=0) for it in items])
            rows = self.settings.max_rows
            outs = [purifier(x[i:i + rows], noise=noise[i:i + rows]) for i in range(0, x.shape[0], rows)]
            y = torch.cat(outs).numpy()
        res, off = [], 0
        for it in items:
            b, n = it.x.shape[0], it.x.shape[0] * it.k
            res.append({"PURIFIED": np.ascontiguousarray(y[off:off + n].reshape(b, -1, *y.shape[2:]))})
            off += n
        return res

    def __call__(self, requests: Sequence[Inputs]) -> list[dict[str, np.ndarray] | Exception]:
        return serve_batch(self.prepare, self.run, requests)


@dataclass
class ClassifyItem:
    x: Any  # torch [B*k, C, H, W]
    k: int


class ClassifierService:
    def __init__(self, version_dir: str | Path, settings: ClassifierSettings = ClassifierSettings(),
                 require_card: bool = True):
        _set_threads(settings.threads)
        self.settings = settings
        self.version = load_version(version_dir, "classifier", require_card)
        self.model = load_classifier(self.version.weights)
        arch = self.version.meta.get("arch", {})
        channels = len(self.model.normalize.mean.reshape(-1))
        size = int(arch.get("image_size", 32))  # dbp.data pads every dataset to 32x32
        self.chw = (channels, size, size)

    def prepare(self, r: Inputs) -> ClassifyItem:
        x, batch = images_and_batch(r)
        k = check_votes(r.get("VOTES"), batch, self.settings.max_votes)
        x = check_images(x, self.chw, k, self.settings.range_tolerance)
        return ClassifyItem(torch.from_numpy(x).reshape(-1, *self.chw), k)

    def run(self, items: list[ClassifyItem]) -> list[dict[str, np.ndarray]]:
        with torch.inference_mode():
            logits = _chunked(self.model, torch.cat([it.x for it in items]), self.settings.max_rows).float().numpy()
        res, off = [], 0
        for it in items:
            n = it.x.shape[0]
            res.append(aggregate_votes(logits[off:off + n], it.k))
            off += n
        return res

    def __call__(self, requests: Sequence[Inputs]) -> list[dict[str, np.ndarray] | Exception]:
        return serve_batch(self.prepare, self.run, requests)


@dataclass
class CertifyItem:
    x: Any  # torch [B, C, H, W]
    seeds: list[int]
    n: int
    sigma: float
    alpha: float


class CertifyService:
    """Randomized smoothing served (dbp.certify): CERTIFY per image with the request's n, sigma (one of the
    configured sigmas), alpha and the image's explicit seed, n0 fixed by the config. Loads the denoiser UNet from
    the version dir (weights/) and the classifier version the config names; refuses to start unless the
    version's certify_card.json is bound to exactly both (dbp.repository.check_certify_version)."""

    def __init__(self, version_dir: str | Path, settings: CertifySettings = CertifySettings()):
        from ..certify import smoothed_base  # scipy: only this model's stub needs it

        _set_threads(settings.threads)
        self.settings = settings
        version_dir = Path(version_dir)
        self.version = load_version(version_dir, repository.CERTIFY_MODEL, require_card=False)
        self.classifier_version = load_version(
            repository.version_dir(version_dir.parent.parent, "classifier", settings.classifier_version),
            "classifier")
        self.card = repository.check_certify_version(version_dir, self.classifier_version.weights)
        unet = load_unet(self.version.weights)
        classifier = load_classifier(self.classifier_version.weights)
        cfg = unet.unet.config
        self.chw = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
        # one smoothed base classifier per served sigma (the timestep follows from sigma)
        self.models = {s: smoothed_base(classifier, s, unet).eval() for s in settings.sigma_values}

    @property
    def describe(self) -> str:
        return (f", sigmas {self.settings.sigmas}, n0 {self.settings.n0}, max_n {self.settings.max_n}, classifier "
                f"v{self.settings.classifier_version}, card bound to both")

    def prepare(self, r: Inputs) -> CertifyItem:
        x, batch = images_and_batch(r)
        x = check_images(x, self.chw, 1, self.settings.range_tolerance)
        seeds = check_seeds(r.get("SEED"), batch)
        if seeds is None:
            raise RequestError("missing input SEED: a certificate is computed with an explicit seed per image")
        n, sigma, alpha = certify_request(r.get("N"), r.get("SIGMA"), r.get("ALPHA"), batch, self.settings)
        return CertifyItem(torch.from_numpy(x), seeds, n, sigma, alpha)

    def run(self, items: list[CertifyItem]) -> list[dict[str, np.ndarray]]:
        from ..certify import SmoothingConfig, certify

        res = []
        for it in items:
            cfg = SmoothingConfig(sigma=it.sigma, n0=self.settings.n0, n=it.n, alpha=it.alpha,
                                  max_rows=self.settings.max_rows)
            certs = [certify(self.models[it.sigma], it.x[b], cfg, torch.Generator().manual_seed(it.seeds[b]))
                     for b in range(it.x.shape[0])]
            res.append({"LABEL": np.array([[c.label] for c in certs], dtype=np.int64),
                        "RADIUS": np.array([[c.radius] for c in certs], dtype=np.float32),
                        "P_LOWER": np.array([[c.p_a_lower] for c in certs], dtype=np.float32),
                        "COUNT": np.array([[c.count_a] for c in certs], dtype=np.int64),
                        "COUNTS": np.array([c.counts for c in certs], dtype=np.int64),
                        "SECONDS": np.array([[c.seconds] for c in certs], dtype=np.float32)})
        return res

    def __call__(self, requests: Sequence[Inputs]) -> list[dict[str, np.ndarray] | Exception]:
        return serve_batch(self.prepare, self.run, requests)
