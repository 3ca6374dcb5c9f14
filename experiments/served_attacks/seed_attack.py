"""The seed attack of issue 20, against the real tritonserver and the real gateway.

  python -m experiments.served_attacks.seed_attack                       # 32 held-out images, PGD-20
  python -m experiments.served_attacks.seed_attack --n_images 8 --steps 5 --threads 2

An attacker with the public weights picks a client seed s and computes OFFLINE, for image i, the noise that
Triton's purifier draws for noise seed s + i (dbp.serving.services.PurifierService.noise_for, the served code
itself, built from the served config.pbtxt), then a DW-box example for exactly that noise (dbp.attacks,
mode "dwbox", PGD-20 l_inf 8/255, best iterate), rounded to the 8-bit grid so a PNG carries it exactly.
The same examples are then sent
  (a) straight to Triton with SEED = s + i: what a gateway that passes the client's seed through would send;
  (b) through the gateway with `seed=s`: Triton gets HMAC(SEED_SECRET, s + i, image) instead;
  (c) through the gateway without a seed: fresh noise, the served setting.
Expected: (a) ~ the DW-box figure (the attack's own fixed-noise outcome), (b) ~ (c) ~ the fresh-noise figure.
Clean accuracy is the clean images through the gateway (fresh noise). Accuracies with 95% Wilson intervals on
the same images; (a) vs (b) paired (one-sided exact McNemar). Writes runs/served_attacks/seed_attack.{json,md}
and a copy in docs/results/served_attacks/ (--copy_to '' to skip).
"""
from __future__ import annotations

import argparse
import secrets
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from dbp.attacks import AttackConfig, build_attack
from dbp.diffusion import PurifyNoise
from dbp.models import Defense
from dbp.paired import mcnemar_one_sided

from .common import (EPS_LINF, ROOT, GatewayClassifier, accuracy, fmt, heldout, newest_pair_repo, provenance,
                     served_services, served_settings, to_grid, triton_raw_seed, write_outputs)


def seed_noise(purifier_service, x01: torch.Tensor, seeds: Sequence[int]) -> PurifyNoise:
    """The noise Triton's purifier draws for these rows with SEED = seeds (votes = 1): the served code itself."""
    from dbp.serving.services import PurifyItem
    return purifier_service.noise_for(PurifyItem(x01, 1, [int(s) for s in seeds]))


def craft(purifier_service, classifier_service, x01: torch.Tensor, y: torch.Tensor, seeds: Sequence[int],
          steps: int = 20, eps: float = EPS_LINF, step: Optional[float] = None, batch: int = 8,
          progress: bool = False) -> dict:
    """DW-box examples for the noise of `seeds`, on the 8-bit grid. Per image the best iterate or the last one,
    whichever (after rounding) fools the defence under that noise; returns the examples and their offline
    outcome under that noise (what Triton answers to a raw seed, up to float rounding)."""
    defense = Defense(purifier_service.purifier, classifier_service.model)
    atk = build_attack(defense, AttackConfig(norm="linf", eps=eps, step=step, steps=steps, mode="dwbox"))
    xs, preds, clean = [], [], []
    for i in tqdm(range(0, len(x01), batch), desc="DW-box for the seeds' noise", disable=not progress):
        xb, yb = x01[i:i + batch], y[i:i + batch]
        noise = seed_noise(purifier_service, xb, seeds[i:i + batch])
        res = atk(xb, yb, noise=noise)
        cands = [to_grid(res.x_adv, xb, eps), to_grid(res.x_last, xb, eps)]
        with torch.no_grad():
            clean.append(defense(xb, noise=noise).argmax(1))
            p = [defense(c, noise=noise).argmax(1) for c in cands]
        use_last = (p[0] == yb) & (p[1] != yb)
        xs.append(torch.where(use_last[:, None, None, None], cands[1], cands[0]))
        preds.append(torch.where(use_last, p[1], p[0]))
    return {"x_adv": torch.cat(xs), "pred": torch.cat(preds), "clean_pred": torch.cat(clean)}


def send_three_ways(gateway: GatewayClassifier, triton_grpc: str, x_adv: torch.Tensor, client_seed: int
                    ) -> dict[str, np.ndarray]:
    """Labels for the same examples: (a) Triton with raw seeds s + i, (b) gateway seed=s, (c) gateway, no seed."""
    seeds = [client_seed + i for i in range(len(x_adv))]
    return {"raw_seed_triton": triton_raw_seed(triton_grpc, x_adv, seeds),
            "gateway_seed": gateway(x_adv, seed=client_seed)[0],
            "gateway_fresh": gateway(x_adv)[0]}


def markdown(r: dict) -> str:
    s, rows = r["settings"], r["rows"]
    lines = [f"# Seed attack on the served stack ({r['provenance']['date_utc']})", "",
             f"Version pair {r['version']}, {s['sampler']} N={s['num_inference_steps']} t*={s['t_star']}; "
             f"{r['n_images']} held-out Fashion-MNIST test images (indices {r['indices'][0]}..{r['indices'][-1]}); "
             f"DW-box PGD-{r['attack']['steps']} l_inf {r['attack']['eps_255']}/255 for the noise of client seed "
             f"{r['client_seed']} + i, computed offline with the served code; examples on the 8-bit grid.", "",
             "| what the examples are sent to | accuracy [95% Wilson] |", "|---|---|",
             f"| clean images, gateway, fresh noise | {fmt(rows['clean_gateway'])} |",
             f"| offline: the attack's own outcome under the seeds' noise (DW-box) | {fmt(rows['offline_dwbox'])} |",
             f"| (a) Triton with the raw seeds s+i (a gateway without the secret) | {fmt(rows['raw_seed_triton'])} |",
             f"| (b) gateway with `seed=s` (HMAC-derived noise seeds) | {fmt(rows['gateway_seed'])} |",
             f"| (c) gateway without a seed (fresh noise) | {fmt(rows['gateway_fresh'])} |", "",
             f"(a) agrees with the offline prediction on {r['raw_vs_offline_agree']}/{r['n_images']} images. "
             f"(b) vs (a), paired: {r['paired']['b_only']} images right only with the secret, "
             f"{r['paired']['a_only']} only with the raw seed; one-sided exact McNemar p = {r['paired']['p']:.3g}.",
             "", f"Wall time {r['wall_s']:.0f} s (attack {r['attack_s']:.0f} s, {r['threads']} torch thread(s)). "
             f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="its newest version pair is served")
    p.add_argument("--n_images", type=int, default=32, help="the last N images of the test set")
    p.add_argument("--steps", type=int, default=20, help="PGD steps")
    p.add_argument("--eps", type=float, default=8.0, help="l_inf budget in 1/255 units")
    p.add_argument("--client_seed", type=int, default=424242, help="the seed s the attacker sends")
    p.add_argument("--batch", type=int, default=8, help="images per attack batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the offline attack")
    p.add_argument("--data_root", default=None, help="Fashion-MNIST folder (default: dbp.data's)")
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "served_attacks"))
    p.add_argument("--copy_to", default=str(ROOT / "docs" / "results" / "served_attacks"),
                   help="also copy the JSON and markdown here ('' = no copy)")
    a = p.parse_args(argv)
    from loadtests.stack import GatewayConfig, Stack

    t0 = time.monotonic()
    prov = provenance()  # at the start: the commit and tree the run began from
    with tempfile.TemporaryDirectory(prefix="dbp-seed-attack-") as tmp:
        repo = Path(tmp) / "model_repository"
        version = newest_pair_repo(Path(a.repo), repo)
        settings = served_settings(repo)
        psvc, csvc = served_services(repo, version)
        torch.set_num_threads(a.threads)  # after the services, which set the served thread count
        x, y, idx = heldout(a.n_images, a.data_root)
        seeds = [a.client_seed + i for i in range(a.n_images)]
        ta = time.monotonic()
        crafted = craft(psvc, csvc, x, y, seeds, steps=a.steps, eps=a.eps / 255, batch=a.batch, progress=True)
        attack_s = time.monotonic() - ta
        secret = secrets.token_hex(32)  # the deployment's; the attacker above never saw it
        with Stack(repo=repo, run_dir=Path(tmp) / "stack",
                   gateway=GatewayConfig(extra_env={"DBP_GATEWAY_SEED_SECRET": secret})) as stack:
            gw = GatewayClassifier(stack.gateway_url)
            try:
                with tqdm(total=4, desc="served: clean, (a), (b), (c)") as bar:
                    clean, _ = gw(x)
                    bar.update()
                    labels = {"raw_seed_triton": triton_raw_seed(stack.triton.grpc_url, crafted["x_adv"], seeds)}
                    bar.update()
                    labels["gateway_seed"] = gw(crafted["x_adv"], seed=a.client_seed)[0]
                    bar.update()
                    labels["gateway_fresh"] = gw(crafted["x_adv"])[0]
                    bar.update()
            finally:
                gw.close()
    yn = y.numpy()
    rows = {"clean_gateway": accuracy(clean == yn), "offline_clean_seed_noise": accuracy(crafted["clean_pred"] == y),
            "offline_dwbox": accuracy(crafted["pred"] == y)}
    rows.update({k: accuracy(v == yn) for k, v in labels.items()})
    ra, rb = np.asarray(rows["raw_seed_triton"]["per_image"]), np.asarray(rows["gateway_seed"]["per_image"])
    b_only, a_only = int(((rb == 1) & (ra == 0)).sum()), int(((ra == 1) & (rb == 0)).sum())
    result = {"what": "issue 20 seed attack", "version": version, "settings": settings, "n_images": a.n_images,
              "indices": idx, "labels": yn.tolist(), "client_seed": a.client_seed,
              "attack": {"algorithm": "pgd", "mode": "dwbox", "norm": "linf", "eps_255": a.eps, "steps": a.steps,
                         "keep": "best (or the last iterate where only it fools after rounding)", "loss": "ce"},
              "rows": rows, "raw_vs_offline_agree": int((labels["raw_seed_triton"] == crafted["pred"].numpy()).sum()),
              "paired": {"b_only": b_only, "a_only": a_only, "p": mcnemar_one_sided(b_only, a_only)},
              "threads": a.threads, "attack_s": attack_s, "wall_s": time.monotonic() - t0,
              "command": shlex.join(["python", "-m", "experiments.served_attacks.seed_attack",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "provenance": prov}
    md = markdown(result)
    paths = write_outputs(result, md, Path(a.out_dir), "seed_attack", Path(a.copy_to) if a.copy_to else None)
    print(md)
    print("wrote " + ", ".join(str(q) for q in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
