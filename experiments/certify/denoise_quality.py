"""How well a diffusion checkpoint denoises the smoothing noise in one shot, per sigma (issue 23 item 1).

  python -m experiments.certify.denoise_quality --unet runs/certify/denoiser/checkpoint
  python -m experiments.certify.denoise_quality --unet model_repository/purifier/1/weights --sigmas 0.25 0.5

For each sigma: the timestep t with sqrt((1 - abar_t)/abar_t) = 2 sigma, then on the first --n test images, with the
same seeded noise for every checkpoint (paired comparisons): the MSE and PSNR of x + sigma delta (unclipped) and of
the one-shot x_hat against x (pixels in [0, 1]), and the classifier's accuracy on x, on x + sigma delta and on
x_hat, i.e. one draw of the base classifier h that dbp.certify smooths (SmoothingNoise is the code under test).
Prints a table and one JSON line; --json also writes it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from dbp import repository
from dbp.certify import SmoothingNoise
from dbp.data import load_dataset
from dbp.models import load_classifier, load_unet
from dbp.runtime import set_threads


def evaluate(eps_net, classifier, x: torch.Tensor, y: torch.Tensor, sigma: float, seed: int, batch: int) -> dict:
    denoise, plain = SmoothingNoise(sigma, eps_net), SmoothingNoise(sigma)
    g = torch.Generator().manual_seed(seed)
    sums = {k: 0.0 for k in ("mse_noisy", "mse_denoised", "psnr_noisy", "psnr_denoised", "acc_clean", "acc_noisy",
                             "acc_denoised")}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            noise = denoise.sample_noise(xb, g)
            z, x_hat = plain(xb, noise=noise), denoise(xb, noise=noise)
            for name, img in (("noisy", z), ("denoised", x_hat)):
                mse = (img - xb).pow(2).flatten(1).mean(1)
                sums[f"mse_{name}"] += float(mse.sum())
                sums[f"psnr_{name}"] += float((10 * torch.log10(1 / mse.clamp_min(1e-12))).sum())
            for name, img in (("clean", xb), ("noisy", z), ("denoised", x_hat)):
                sums[f"acc_{name}"] += float((classifier(img).argmax(1) == yb).sum())
    out = {"sigma": sigma, "t": denoise.t, "n": len(x)}
    out.update({k: round(v / len(x), 5) for k, v in sums.items()})
    out["seconds_per_image"] = round((time.perf_counter() - t0) / len(x), 4)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.certify.denoise_quality", description=__doc__.split("\n")[0])
    ap.add_argument("--unet", required=True, help="a dbp diffusion/ADDT checkpoint directory")
    ap.add_argument("--which", default="ema", choices=("ema", "model"), help="which weights of the checkpoint")
    ap.add_argument("--classifier", default=None, help="classifier checkpoint (default: the deployed one)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5], help="noise std in [0, 1] pixel units")
    ap.add_argument("--n", type=int, default=256, help="first n test images")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (the same draws for every checkpoint)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args(argv)
    set_threads(a.threads)
    classifier_path = a.classifier if a.classifier is not None else repository.deployed_weights("classifier")
    eps_net, classifier = load_unet(a.unet, a.which), load_classifier(classifier_path)
    test = load_dataset(a.dataset, "test").head(a.n)
    x, y = test.float01(), test.labels
    try:
        step = json.loads((Path(a.unet) / "meta.json").read_text()).get("step")
    except (OSError, ValueError):
        step = None
    rows = [evaluate(eps_net, classifier, x, y, s, a.seed, a.batch) for s in a.sigmas]
    result = {"unet": str(a.unet), "which": a.which, "step": step, "classifier": str(classifier_path),
              "seed": a.seed, "rows": rows}
    print(f"{a.unet} ({a.which}, step {step}), {a.n} test images, classifier {classifier_path}", file=sys.stderr)
    print(f"{'sigma':>6} {'t':>4} {'MSE noisy':>10} {'MSE x_hat':>10} {'PSNR noisy':>10} {'PSNR x_hat':>10} "
          f"{'acc x':>6} {'acc noisy':>9} {'acc x_hat':>9} {'s/img':>6}", file=sys.stderr)
    for r in rows:
        print(f"{r['sigma']:>6} {r['t']:>4} {r['mse_noisy']:>10.5f} {r['mse_denoised']:>10.5f} "
              f"{r['psnr_noisy']:>10.2f} {r['psnr_denoised']:>10.2f} {r['acc_clean']:>6.3f} {r['acc_noisy']:>9.3f} "
              f"{r['acc_denoised']:>9.3f} {r['seconds_per_image']:>6.3f}", file=sys.stderr)
    line = json.dumps(result)
    print(line)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(line + "\n")
    assert all(math.isfinite(r["mse_denoised"]) for r in rows)
    return result


if __name__ == "__main__":
    main()
