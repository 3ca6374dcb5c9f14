"""A black-box, score-based query attack through the real gateway over HTTP: Square (torchattacks), l_inf 8/255.

  python -m experiments.served_attacks.square_attack                          # 16 held-out images, 300 queries
  python -m experiments.served_attacks.square_attack --n_images 2 --n_queries 20   # time it first

The served defence is wrapped as a torch.nn.Module that torchattacks can query (`GatewayModel`): every call
POSTs the batch as 8-bit PNGs to /classify (votes=1, no seed, so every query gets fresh noise, as any client
without a seed does) and returns the log of the returned probabilities, on which Square's margin loss works.
No gradient is taken. Square's l_inf steps move pixels to x +- eps, which stays on the 8-bit grid for
Fashion-MNIST images, so the PNGs carry its candidates exactly.

Reported: clean accuracy (one fresh query per image), and the robust accuracy of Square's outputs judged by
one more fresh query each (single shot, as served), 95% Wilson intervals; queries and wall time. It is a
diagnostic: a query attack must do no better than the white-box EoT attack (the gradient through the purifier).
`--eot_reference` also runs dbp's white-box PGD + EoT (offline, the served settings) on the same images and
judges its examples through the gateway the same way (costly on a CPU: ~K x the DW-box attack).
Writes runs/served_attacks/square_attack.{json,md} and a copy in docs/results/served_attacks/.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .common import (EPS_LINF, ROOT, GatewayClassifier, accuracy, fmt, heldout, newest_pair_repo, provenance,
                     served_services, served_settings, to_grid, write_outputs)

SQUARE_VERSION = "3.5.1"  # pinned in the Makefile (--no-deps), noted in requirements.lock


class GatewayModel(nn.Module):
    """x01 [B, C, H, W] on the 1/255 grid -> log probabilities [B, classes] from the gateway (no gradient).

    Counts queries (images sent) and requests. A zero-size frozen parameter tells torchattacks the device."""

    def __init__(self, gateway: GatewayClassifier, floor: float = 1e-7, bar: Optional[tqdm] = None):
        super().__init__()
        self.gateway, self.floor, self.bar = gateway, floor, bar
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.queries = 0
        self.calls = 0

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        _, probs = self.gateway(x01.detach().cpu().clamp(0, 1))
        self.queries += len(x01)
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)
        return torch.from_numpy(np.log(np.clip(probs, self.floor, 1.0))).float()


def square(model: GatewayModel, x01: torch.Tensor, y: torch.Tensor, n_queries: int, eps: float = EPS_LINF,
           seed: int = 0, p_init: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Square's best candidate for every image, on the 8-bit grid, and the queries each image took.

    torchattacks.Square's own search (`attack_single_run`: margin loss, one restart) on all images. Not `atk(x, y)`:
    that wrapper skips images one first noisy query got wrong and returns the clean image unless one more noisy
    query misclassifies the candidate, a selection made for deterministic models; against fresh noise per query
    it threw away every candidate in a first run here. An image leaves the search once a query (a noisy draw)
    misclassified it, so it took fewer than n_queries + 1 queries."""
    import torchattacks
    atk = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=n_queries, n_restarts=1, p_init=p_init,
                              loss="margin", resc_schedule=True, seed=seed, verbose=False)
    atk.init_hyperparam(x01)
    torch.random.manual_seed(seed)
    with torch.no_grad():
        used, x_best = atk.attack_single_run(x01.clone(), y.clone())
    return to_grid(x_best, x01, eps), used.long()


def markdown(r: dict) -> str:
    s, rows = r["settings"], r["rows"]
    lines = [f"# Square attack through the gateway ({r['provenance']['date_utc']})", "",
             f"Version pair {r['version']}, {s['sampler']} N={s['num_inference_steps']} t*={s['t_star']}; "
             f"{r['n_images']} held-out Fashion-MNIST test images (indices {r['indices'][0]}..{r['indices'][-1]}); "
             f"torchattacks {r['attack']['torchattacks']} Square l_inf {r['attack']['eps_255']}/255, margin loss, "
             f"p_init {r['attack']['p_init']}, at most {r['attack']['n_queries']} iterations; every query through "
             f"POST /classify without a seed (fresh noise).", "",
             "| | accuracy [95% Wilson] |", "|---|---|",
             f"| clean, gateway, fresh noise | {fmt(rows['clean_gateway'])} |",
             f"| Square's best candidates, one fresh query each (single shot) | {fmt(rows['square_gateway'])} |"]
    if "eot_gateway" in rows:
        lines.append(f"| white-box PGD-{r['eot']['steps']} + EoT-{r['eot']['eot']} (offline), one fresh query each "
                     f"| {fmt(rows['eot_gateway'])} |")
    lines += ["", f"Queries: {r['queries']} images in {r['requests']} requests "
              f"({r['queries'] / r['n_images']:.0f} per image on average), Square {r['square_s']:.0f} s. "
              f"{r['square_own_fooled']} image(s) left Square's search because one (noisy) query misclassified them.",
              "", f"Wall time {r['wall_s']:.0f} s. Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="its newest version pair is served")
    p.add_argument("--n_images", type=int, default=16, help="the last N images of the test set")
    p.add_argument("--n_queries", type=int, default=300, help="Square iterations (queries per image at most)")
    p.add_argument("--eps", type=float, default=8.0, help="l_inf budget in 1/255 units")
    p.add_argument("--p_init", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0, help="Square's own random seed")
    p.add_argument("--eot_reference", action="store_true",
                   help="also white-box PGD + EoT offline on the same images, judged through the gateway")
    p.add_argument("--eot", type=int, default=10)
    p.add_argument("--eot_steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (EoT reference)")
    p.add_argument("--data_root", default=None, help="Fashion-MNIST folder (default: dbp.data's)")
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "served_attacks"))
    p.add_argument("--copy_to", default=str(ROOT / "docs" / "results" / "served_attacks"),
                   help="also copy the JSON and markdown here ('' = no copy)")
    a = p.parse_args(argv)
    from loadtests.stack import Stack
    import torchattacks
    if torchattacks.__version__ != SQUARE_VERSION:
        print(f"WARNING: torchattacks {torchattacks.__version__}, not the pinned {SQUARE_VERSION}", file=sys.stderr)

    torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    prov = provenance()  # at the start: the commit and tree the run began from
    x, y, idx = heldout(a.n_images, a.data_root)
    yn = y.numpy()
    rows, extra = {}, {}
    with tempfile.TemporaryDirectory(prefix="dbp-square-") as tmp:
        repo = Path(tmp) / "model_repository"
        version = newest_pair_repo(Path(a.repo), repo)
        settings = served_settings(repo)
        x_eot = None
        if a.eot_reference:
            from dbp.attacks import AttackConfig, build_attack
            from dbp.models import Defense
            psvc, csvc = served_services(repo, version)
            torch.set_num_threads(a.threads)
            atk = build_attack(Defense(psvc.purifier, csvc.model),
                               AttackConfig(norm="linf", eps=a.eps / 255, steps=a.eot_steps, eot=a.eot, mode="eot"))
            te = time.monotonic()
            parts = []
            for i in tqdm(range(0, a.n_images, 4), desc=f"white-box PGD-{a.eot_steps} + EoT-{a.eot}"):
                res = atk(x[i:i + 4], y[i:i + 4], generator=torch.Generator().manual_seed(i))
                parts.append(to_grid(res.x_adv, x[i:i + 4], a.eps / 255))
            x_eot = torch.cat(parts)
            extra["eot"] = {"steps": a.eot_steps, "eot": a.eot, "keep": "best", "loss": "ce",
                            "attack_s": time.monotonic() - te}
        with Stack(repo=repo, run_dir=Path(tmp) / "stack") as stack:
            gw = GatewayClassifier(stack.gateway_url)
            try:
                rows["clean_gateway"] = accuracy(gw(x)[0] == yn)
                with tqdm(total=a.n_queries + 1, desc="Square: requests") as bar:
                    model = GatewayModel(gw, bar=bar)
                    ts = time.monotonic()
                    x_adv, used = square(model, x, y, a.n_queries, a.eps / 255, a.seed, a.p_init)
                    square_s = time.monotonic() - ts
                linf = float((x_adv - x).abs().amax()) * 255
                if linf > a.eps + 1e-3:
                    raise RuntimeError(f"Square left the ball: l_inf {linf:.3f}/255")
                rows["square_gateway"] = accuracy(gw(x_adv)[0] == yn)
                if x_eot is not None:
                    rows["eot_gateway"] = accuracy(gw(x_eot)[0] == yn)
            finally:
                gw.close()
    own_fooled = int((used < a.n_queries + 1).sum())  # left the search: one query misclassified it
    result = {"what": "issue 20 Square query attack through the gateway", "version": version, "settings": settings,
              "n_images": a.n_images, "indices": idx, "labels": yn.tolist(),
              "attack": {"torchattacks": torchattacks.__version__, "algorithm": "Square", "norm": "Linf",
                         "eps_255": a.eps, "n_queries": a.n_queries, "p_init": a.p_init, "loss": "margin",
                         "n_restarts": 1, "seed": a.seed, "linf_255_max": linf},
              "rows": rows, "queries": model.queries, "requests": model.calls, "square_s": square_s,
              "square_own_fooled": own_fooled, "queries_per_image": used.tolist(), **extra, "threads": a.threads,
              "wall_s": time.monotonic() - t0,
              "command": shlex.join(["python", "-m", "experiments.served_attacks.square_attack",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "provenance": prov}
    md = markdown(result)
    paths = write_outputs(result, md, Path(a.out_dir), "square_attack", Path(a.copy_to) if a.copy_to else None)
    print(md)
    print("wrote " + ", ".join(str(q) for q in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
