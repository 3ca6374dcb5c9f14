"""The cost of one certificate: CERTIFY (n0 + n noisy images through the one-shot denoiser and the classifier) timed
on a few test images, with the certificates themselves.

  python -m experiments.certify.cost --unet runs/certify/denoiser/checkpoint --sigma 0.25 --n 1000 --images 4

The time is linear in n0 + n (every row is one UNet call and one classifier call), so seconds per image at the
served n = (n0 + n) / rows_per_second.
"""
from __future__ import annotations

import argparse
import json
import time

from dbp import repository
from dbp.certify import SmoothingConfig, certify_batch, smoothed_base
from dbp.data import load_dataset
from dbp.models import load_classifier, load_unet
from dbp.runtime import set_threads


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.certify.cost", description=__doc__.split("\n")[0])
    ap.add_argument("--unet", required=True)
    ap.add_argument("--classifier", default=None, help="default: the deployed classifier")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--max_rows", type=int, default=250)
    ap.add_argument("--images", type=int, default=4, help="the first test images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    cls_path = a.classifier if a.classifier is not None else repository.deployed_weights("classifier")
    model = smoothed_base(load_classifier(cls_path, a.device), a.sigma, load_unet(a.unet, device=a.device)).to(a.device)
    test = load_dataset("fashion_mnist", "test").head(a.images)
    cfg = SmoothingConfig(sigma=a.sigma, n0=a.n0, n=a.n, alpha=a.alpha, max_rows=a.max_rows, seed=a.seed)
    t0 = time.perf_counter()
    certs = certify_batch(model, test.float01().to(a.device), cfg)
    wall = time.perf_counter() - t0
    rows_per_s = a.images * (a.n0 + a.n) / wall
    out = {"unet": a.unet, "classifier": str(cls_path), "config": cfg.__dict__, "device": a.device,
           "threads": a.threads, "t": model.purifier.t, "seconds_per_image": round(wall / a.images, 2),
           "rows_per_second": round(rows_per_s, 1),
           "seconds_per_image_at_n10000": round((a.n0 + 10_000) / rows_per_s, 1),
           "certificates": [{"y": int(y), "label": c.label, "radius": round(c.radius, 4), "p_a_lower": round(c.p_a_lower, 5),
                             "count_a": c.count_a, "seconds": round(c.seconds, 2)}
                            for c, y in zip(certs, test.labels.tolist())]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
