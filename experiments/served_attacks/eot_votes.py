"""Issue 20's white-box rows on the served version, offline, on the same held-out images as the Square row.

  python -m experiments.served_attacks.eot_votes                                  # 16 held-out images, resumable
  python -m experiments.served_attacks.eot_votes --n_images 2 --steps 2 --out /tmp/ev   # time it first
  python -m experiments.served_attacks.eot_votes --rows voted &  python -m experiments.served_attacks.eot_votes \\
      --rows voted --chunks 3,2 &  ...       # chunks in parallel processes; a last plain run assembles

The defence is the repository's newest version pair (version 2 today) built from its weights
(dbp.repository.weights_dir) with the purification settings the purifier's config.pbtxt serves (DDIM N=100,
t*=100); images: the last N Fashion-MNIST test images (experiments/served_attacks/common.heldout); l_inf 8/255,
step 2/255, best iterate kept (the gate's PGD). Every adversarial image is rounded onto the 8-bit grid (what a
PNG carries to the server) before it is judged. Rows (attack and evaluation by dbp's library, nothing of its own):

  eot    PGD-20 + EoT-10 on dbp.models.Defense (fresh noise per draw); judged by one fresh purification
         (single shot = the served votes=1), by the expected accuracy over k fresh purifications
         (dbp.robustness.expected_correct), and by the served majority of max_votes fresh purifications
         (the attack not aimed at the votes);
  voted  PGD-20 + EoT on dbp.models.VotedDefense(max_votes): the gradient of the mean probabilities of the k votes,
         ceil(EoT / k) draws of k purifications per step (dbp.gate.config.voted_eot's formula); judged by the
         served majority label (dbp.gate.protocol.majority_correct); clean majority too;
  dwbox  PGD-20 with one fixed noise draw (DW-box): judged with that noise, and the same images under fresh noise.

Each image chunk of each row is saved under --out (chunks/) as soon as it is done, so a rerun skips it; rows
finished are assembled into --out/eot_votes.{json,md} (Wilson 95% intervals; expected accuracy: mean_interval)
and copied to docs/results/served_attacks/ once all rows are there.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from dbp import repository
from dbp.attacks import AttackConfig, build_attack
from dbp.gate.protocol import majority_correct
from dbp.models import Defense, Purifier, VotedDefense, load_classifier, load_unet
from dbp.robustness import expected_correct, mean_interval, single_shot
from dbp.stats import wilson

from .common import EPS_LINF, ROOT, heldout, provenance, to_grid, write_outputs

ROWS = ("eot", "voted", "dwbox")
STREAMS = {"eot": 100, "voted": 200, "dwbox": 300}  # generator streams per row (+ chunk, + use)


def voted_draws(eot: int, votes: int) -> int:
    """Draws of the k votes per gradient step, >= eot purifications: the gate's voted_eot formula."""
    return max(1, -(-eot // votes))


def build_defense(repo: Path, version: int, settings: dict) -> Defense:
    eps_net = load_unet(repository.weights_dir(repo, "purifier", version))
    classifier = load_classifier(repository.weights_dir(repo, "classifier", version))
    purifier = Purifier(eps_net, t_star=int(settings["t_star"]), sampler=settings["sampler"],
                        num_inference_steps=int(settings["num_inference_steps"]))
    return Defense(purifier, classifier).eval()


def gen(seed: int, row: str, chunk: int, use: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STREAMS[row] * 1009 + chunk * 17 + use)


def on_grid(defense: Defense, res, x: torch.Tensor, y: torch.Tensor, eps: float, noise=None) -> torch.Tensor:
    """The kept candidate on the 8-bit grid; DW-box (noise given): the best or the last iterate, whichever fools
    the defence under that noise after rounding (as seed_attack.craft)."""
    best = to_grid(res.x_adv, x, eps)
    if noise is None or res.x_last is None:
        return best
    last = to_grid(res.x_last, x, eps)
    use_last = single_shot(defense, best, y, noise=noise) & ~single_shot(defense, last, y, noise=noise)
    return torch.where(use_last[:, None, None, None], last, best)


def run_chunk(row: str, defense: Defense, x, y, a, votes: int, c: int) -> dict:
    """One chunk of one row: the attack and every outcome of that row, per image."""
    eps, t0 = a.eps / 255, time.monotonic()
    out: dict = {}
    if row == "eot":
        atk = build_attack(defense, AttackConfig(norm="linf", eps=eps, steps=a.steps, eot=a.eot, mode="eot"))
        res = atk(x, y, generator=gen(a.seed, row, c, 0))
        xa = on_grid(defense, res, x, y, eps)
        out["single_shot"] = single_shot(defense, xa, y, generator=gen(a.seed, row, c, 1))
        out["expected"] = expected_correct(defense, xa, y, a.k, generator=gen(a.seed, row, c, 2))
        out[f"majority{votes}"] = majority_correct(VotedDefense(defense, votes), xa, y, gen(a.seed, row, c, 3))
        out["clean_single_shot"] = single_shot(defense, x, y, generator=gen(a.seed, row, c, 4))
        out["clean_expected"] = expected_correct(defense, x, y, a.k, generator=gen(a.seed, row, c, 5))
    elif row == "voted":
        voted = VotedDefense(defense, votes)
        draws = voted_draws(a.eot, votes)
        atk = build_attack(voted, AttackConfig(norm="linf", eps=eps, steps=a.steps, eot=draws, mode="eot"))
        res = atk(x, y, generator=gen(a.seed, row, c, 0))
        xa = on_grid(defense, res, x, y, eps)
        out[f"majority{votes}"] = majority_correct(voted, xa, y, gen(a.seed, row, c, 1))
        out[f"clean_majority{votes}"] = majority_correct(voted, x, y, gen(a.seed, row, c, 2))
    else:
        atk = build_attack(defense, AttackConfig(norm="linf", eps=eps, steps=a.steps, mode="dwbox"))
        res = atk(x, y, generator=gen(a.seed, row, c, 0))
        xa = on_grid(defense, res, x, y, eps, noise=res.noise)
        out["fixed_noise"] = single_shot(defense, xa, y, noise=res.noise)
        out["fresh_noise"] = single_shot(defense, xa, y, generator=gen(a.seed, row, c, 1))
        out["clean_fixed_noise"] = single_shot(defense, x, y, noise=res.noise)
    linf = float((xa - x).abs().amax()) * 255
    if linf > a.eps + 1e-3:
        raise RuntimeError(f"{row}: the example left the ball (l_inf {linf:.3f}/255)")
    return {"per_image": {k: [float(v) for v in t.float().tolist()] for k, t in out.items()},
            "linf_255": linf, "seconds": time.monotonic() - t0, "load_average": list(__import__("os").getloadavg())}


def summary(scores: Sequence[float]) -> dict:
    s = [float(v) for v in scores]
    n = len(s)
    if all(v in (0.0, 1.0) for v in s):
        k = int(sum(s))
        return {"acc": k / n, "ci95": list(wilson(k, n)), "n": n, "correct": k, "interval": "wilson"}
    return {"acc": sum(s) / n, "ci95": list(mean_interval(s)), "n": n, "interval": "mean_interval"}


def fmt(r: dict) -> str:
    lo, hi = r["ci95"]
    tail = f" ({r['correct']}/{r['n']})" if "correct" in r else ""
    return f"{100 * r['acc']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]{tail}"


LABELS = [  # (row, outcome key, text); {v}: max votes, {k}: expected draws, {S}/{E}: steps / EoT
    ("eot", "clean_single_shot", "clean, one fresh purification"),
    ("eot", "clean_expected", "clean, expected accuracy over k={k} fresh purifications"),
    ("dwbox", "fixed_noise", "DW-box PGD-{S}, judged with its own fixed noise"),
    ("dwbox", "fresh_noise", "DW-box PGD-{S} images, one fresh purification"),
    ("eot", "single_shot", "PGD-{S} + EoT-{E}, one fresh purification (single shot = served votes=1)"),
    ("eot", "expected", "PGD-{S} + EoT-{E}, expected accuracy over k={k} fresh purifications"),
    ("eot", "majority{v}", "PGD-{S} + EoT-{E} images (aimed at one vote), majority of votes={v}"),
    ("voted", "clean_majority{v}", "clean, majority of votes={v}"),
    ("voted", "majority{v}", "PGD-{S} + EoT on the mean probabilities of votes={v} ({D} draw(s) of {v} per step), "
                             "majority of votes={v}"),
]


def assemble(chunks: dict, a, meta: dict) -> tuple[dict, str]:
    n_chunks = -(-a.n_images // a.batch)
    done = {r: [chunks[r][c] for c in range(n_chunks)] for r in ROWS if all(c in chunks.get(r, {})
                                                                              for c in range(n_chunks))}
    rows = {}
    for r, parts in done.items():
        keys = parts[0]["per_image"].keys()
        rows[r] = {k: summary([v for p in parts for v in p["per_image"][k]]) for k in keys}
        for k in keys:
            rows[r][k]["per_image"] = [v for p in parts for v in p["per_image"][k]]
        rows[r]["_attack_s"] = sum(p["seconds"] for p in parts)
        rows[r]["_linf_255_max"] = max(p["linf_255"] for p in parts)
    result = {"what": "issue 20: EoT, expected accuracy, voted defence, DW-box on the served version, offline",
              **meta, "rows": rows, "complete": len(done) == len(ROWS)}
    fill = {"v": meta["votes"], "k": a.k, "S": a.steps, "E": a.eot, "D": meta["voted_draws"]}
    s = meta["settings"]
    lines = [f"# White-box attacks on the served version {meta['version']} ({meta['provenance']['date_utc']})", "",
             f"{s['sampler']} N={s['num_inference_steps']} t*={s['t_star']} (purifier/config.pbtxt), "
             f"{a.n_images} held-out Fashion-MNIST test images (indices {meta['indices'][0]}..{meta['indices'][-1]}), "
             f"l_inf {a.eps:g}/255, step 2/255, best iterate; examples rounded to the 8-bit grid; seed {a.seed}.", "",
             "| row | n | accuracy [95%] |", "|---|---|---|"]
    for r, key, text in LABELS:
        key = key.format(**fill)
        if r in rows and key in rows[r]:
            lines.append(f"| {text.format(**fill)} | {rows[r][key]['n']} | {fmt(rows[r][key])} |")
    lines += ["", "Intervals: Wilson for 0/1 outcomes; expected accuracy: dbp.robustness.mean_interval "
              "(normal over the per-image fractions).", "",
              "Seconds per row (sum over chunks, one thread each): " + ", ".join(
                  f"{r} {rows[r]['_attack_s']:.0f} s" for r in rows) + ".",
              "" if result["complete"] else f"Incomplete: rows still missing: "
                                            f"{', '.join(r for r in ROWS if r not in rows)}.", "",
              f"Command: `{meta['command']}`", ""]
    return result, "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT / "model_repository"))
    p.add_argument("--version", type=int, default=None, help="default: the repository's newest purifier version")
    p.add_argument("--n_images", type=int, default=16, help="the last N images of the test set")
    p.add_argument("--votes", type=int, default=None, help="default: max_votes of purifier/config.pbtxt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eot", type=int, default=10)
    p.add_argument("--k", type=int, default=10, help="fresh purifications of the expected accuracy")
    p.add_argument("--eps", type=float, default=EPS_LINF * 255, help="l_inf budget in 1/255 units")
    p.add_argument("--batch", type=int, default=4, help="images per chunk (the unit saved and resumed)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to compute, of {','.join(ROWS)} ('' = assemble)")
    p.add_argument("--chunks", default="", help="only these chunk numbers, in this order, e.g. 3,2 (a helper "
                   "process beside a running one: a chunk another process finished meanwhile is skipped)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_root", default=None)
    p.add_argument("--out", default=str(ROOT / "runs" / "served_attacks" / "eot_votes"))
    p.add_argument("--copy_to", default=str(ROOT / "docs" / "results" / "served_attacks"),
                   help="copy the JSON and markdown here once every row is done ('' = never)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    want = [r for r in a.rows.split(",") if r]
    if set(want) - set(ROWS):
        p.error(f"--rows: unknown {sorted(set(want) - set(ROWS))}")
    repo, out = Path(a.repo), Path(a.out)
    version = a.version or repository.newest_version(repository.model_dir(repo, "purifier"))
    settings = repository.purification_settings(repo)
    votes = a.votes or int(settings["max_votes"])
    x, y, idx = heldout(a.n_images, a.data_root)
    run_cfg = {"version": version, "settings": settings, "votes": votes, "n_images": a.n_images, "indices": idx,
               "steps": a.steps, "eot": a.eot, "k": a.k, "eps_255": a.eps, "batch": a.batch, "seed": a.seed}
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) != json.loads(json.dumps(run_cfg)):
        p.error(f"{out} holds a run with other settings ({cfg_file}): use another --out")
    prov_file = out / "provenance.json"  # the first start's commit, tree and load
    for f, obj in ((cfg_file, run_cfg), (prov_file, provenance())):
        if not f.exists():  # atomically: a helper process may read it at the same moment
            f.with_suffix(f".{__import__('os').getpid()}.tmp").write_text(json.dumps(obj, indent=1) + "\n")
            f.with_suffix(f".{__import__('os').getpid()}.tmp").replace(f)

    defense = None
    n_chunks = -(-a.n_images // a.batch)
    for row in want:
        order = [int(c) for c in a.chunks.split(",") if c] or list(range(n_chunks))
        todo = [c for c in order if 0 <= c < n_chunks and not (out / "chunks" / f"{row}-{c}.json").exists()]
        for c in tqdm(todo, desc=f"{row} (chunks of {a.batch} images)"):
            if (out / "chunks" / f"{row}-{c}.json").exists():
                continue  # another process finished it meanwhile
            if defense is None:
                defense = build_defense(repo, version, settings)
                torch.set_num_threads(a.threads)
            lo, hi = c * a.batch, min((c + 1) * a.batch, a.n_images)
            res = run_chunk(row, defense, x[lo:hi], y[lo:hi], a, votes, c)
            f = out / "chunks" / f"{row}-{c}.json"
            f.parent.mkdir(exist_ok=True)
            f.with_suffix(".tmp").write_text(json.dumps(res) + "\n")
            f.with_suffix(".tmp").replace(f)

    chunks: dict = {}
    for f in sorted((out / "chunks").glob("*.json")) if (out / "chunks").exists() else []:
        r, c = f.stem.rsplit("-", 1)
        chunks.setdefault(r, {})[int(c)] = json.loads(f.read_text())
    meta = {**run_cfg, "voted_draws": voted_draws(a.eot, votes), "labels": y.tolist(), "threads": a.threads,
            "provenance": json.loads(prov_file.read_text()),
            "command": shlex.join(["python", "-m", "experiments.served_attacks.eot_votes",
                                   *(sys.argv[1:] if argv is None else argv)])}
    result, md = assemble(chunks, a, meta)
    copy = Path(a.copy_to) if a.copy_to and result["complete"] else None
    paths = write_outputs(result, md, out, "eot_votes", copy)
    print(md)
    print("wrote " + ", ".join(str(q) for q in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
