"""The robustness gate: attack purifier+classifier in every required setting, build the card, decide.

`training/gate.py` is the CLI over `run(cfg)`. Pieces (each testable on its own):
  - the per-batch protocol (`eval_batch`): clean accuracy (bare, purified, expected), the bare classifier
    under PGD per threat model, and per setting (threat model x norm x mode) PGD with best-iterate
    tracking (plus APGD-CE/DLR with `--apgd true`); DW-box adversarial images are also evaluated under
    fresh noise, the served setting. Saved per batch (state/), sharded over torchrun ranks, merged.
  - sanity checks on a small subset (`sanity`): l_inf 0.3 must collapse the accuracy, EoT gradient
    consistency, a transfer attack from the bare classifier must not beat the white-box one.
  - the card (`build_card`): per setting the per-image minimum over the attacks that ran
    (`worst_case`), intervals, flags (incl. `attack_ineffective`), per-image outcomes bound to the image
    indices and noise seeds (`dbp.paired.OutcomeRecord`), EoT settings' per-image hits out of k, the binding
    hash and the requirements.
  - the verdict: `dbp.gate.verdict.evaluate`, recomputed from the card's per-image evidence under the pinned
    policy (dbp/gate/promotion_policy.json); the baseline is a card measured the same way on the deployed
    version's weights, whose per-image outcomes travel in the new card. The card is signed when
    DBP_GATE_SIGNING_KEY names the gate's private key (dbp.gate.signing); unsigned cards never export.
  - `convergence_report`: robust accuracy against PGD steps and EoT samples (plot).

Purification settings (sampler, N, t*) default to what the repository serves (purifier/config.pbtxt), so the
gate measures what is served.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import distributed, repository, state
from ..attacks import AttackConfig, build_attack
from ..card import CardError, load_card
from ..robustness import expected_correct, is_randomized, mean_interval, single_shot
from . import signing
from .config import GateConfig, GateError, use_deployed, use_served_purification, validate
from .policy import load_policy
from .protocol import Ctx, build, check_state, eval_batch, eval_config, sanity
from .report import baseline_block, build_card, summary_table, write_outputs
from .verdict import evaluate, summary_lines


EXIT_PASS, EXIT_FAIL, EXIT_INCOMPLETE = 0, 1, 3


def batch_file(ctx: Ctx, b: int) -> Path:
    return ctx.state / f"batch_{b:05d}.safetensors"


def load_batch(ctx: Ctx, b: int) -> Optional[dict[str, torch.Tensor]]:
    f = batch_file(ctx, b)
    if not f.exists():
        return None
    try:
        return load_file(f)
    except Exception:  # a torn file from a kill mid-write: recompute that batch
        return None


def save_batch(ctx: Ctx, b: int, res: dict[str, torch.Tensor]) -> None:
    f = batch_file(ctx, b)
    state.save_atomic(f, lambda tmp: save_file(res, tmp))


# ---- the run -------------------------------------------------------------------------------------------

def running(results: list[dict], keys: list[str]) -> dict[str, str]:
    post = {}
    for k in keys:
        vals = [r[k] for r in results if k in r]
        if vals:
            post[k.replace("/pgd-ce", "").replace("clean_purified", "clean")] = f"{float(torch.cat(vals).mean()):.1%}"
    return post


def run_shard(ctx: Ctx, d: distributed.Dist) -> bool:
    """This rank's batches (b % world == rank); True when all of them are saved."""
    mine = [bt for bt in ctx.batches() if bt[0] % d.world_size == d.rank]
    done = {b: r for b, r in ((bt[0], load_batch(ctx, bt[0])) for bt in mine) if r is not None}
    keys = ["clean_purified"] + [f"{s.name}/pgd-ce" for s in ctx.settings]
    bar = tqdm(total=sum(hi - lo for _, lo, hi in mine), initial=sum(hi - lo for b, lo, hi in mine if b in done),
               desc=f"gate[{d.rank}]" if d.world_size > 1 else "gate", unit="img", position=d.rank,
               dynamic_ncols=True, mininterval=1.0)
    bar.set_postfix(running(list(done.values()), keys))
    new = 0
    for b, lo, hi in mine:
        if b in done:
            continue
        if ctx.cfg.max_batches and new >= ctx.cfg.max_batches:
            break
        done[b] = eval_batch(ctx, b, lo, hi)
        save_batch(ctx, b, done[b])
        new += 1
        bar.update(hi - lo)
        bar.set_postfix(running(list(done.values()), keys))
    bar.close()
    return len(done) == len(mine)


def wait_for_ranks(ctx: Ctx, d: distributed.Dist, run_id: str, complete: bool) -> bool:
    """Ranks report through files, not a collective: a barrier would time out on multi-hour imbalances."""
    state.write_json(ctx.state / f"status-{run_id}-{d.rank}.json", {"complete": complete})
    if not d.is_main:
        return complete
    files = [ctx.state / f"status-{run_id}-{r}.json" for r in range(d.world_size)]
    while not all(f.exists() for f in files):
        time.sleep(1.0)
    ok = all(json.loads(f.read_text())["complete"] for f in files)
    for f in files:
        f.unlink(missing_ok=True)
    return ok


def merge(ctx: Ctx) -> dict[str, torch.Tensor]:
    parts = [load_batch(ctx, b) for b, _, _ in ctx.batches()]
    missing = [b for b, p in enumerate(parts) if p is None]
    if missing:
        raise RuntimeError(f"batches {missing} missing from {ctx.state}")
    merged = {}
    for k in dict.fromkeys(k for p in parts for k in p):
        if k.startswith("grid/"):
            merged[k] = parts[0][k]
        elif k == "time_s":
            merged[k] = torch.cat([p[k] for p in parts]).sum()
        else:
            merged[k] = torch.cat([p[k] for p in parts if k in p])
    assert torch.equal(merged["index"], torch.arange(len(ctx.y))), "per-sample results out of order"
    return merged


# ---- convergence -----------------------------------------------------------------------------------------

def convergence_report(ctx: Ctx, steps: tuple[int, ...] = (20, 50, 100), eots: tuple[int, ...] = (10, 20, 50),
                       out: Optional[Path] = None) -> dict:
    """Robust accuracy vs PGD steps (DW-box, each threat model's first norm) and vs EoT samples (stochastic,
    PGD --steps) on ctx's images: the card's figures are converged when the curves are flat. Resumable
    per point (convergence.json, which also keeps the evaluation's configuration: points of another model,
    image count or seed are never mixed in); writes convergence.png."""
    from ..plots import _plt, save_figure

    cfg = ctx.cfg
    out = Path(out or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = out / "convergence.json"
    want = eval_config(ctx)
    res = json.loads(f.read_text()) if f.exists() else {"config": want, "points": {}}
    state.require_same(res.get("config"), want, f, "use another --out_dir or delete that file", GateError)
    x, y = ctx.x.to(ctx.device), ctx.y.to(ctx.device)
    groups = list(dict.fromkeys((s.threat_model, s.norm, s.eps, s.step) for s in ctx.settings))
    todo = [(g, "dwbox", st, 1) for g in groups for st in steps] + [(g, "eot", cfg.steps, k) for g in groups
                                                                    for k in eots]
    for (tm, norm, eps, step), mode, st, k in tqdm(todo, desc="convergence"):
        key = f"{tm}:{norm}:{mode}:steps={st}:eot={k}"
        if key in res["points"]:
            continue
        gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        acfg = AttackConfig(norm=norm, eps=eps, step=step, steps=st, eot=k, mode=mode, keep=cfg.keep)
        r = build_attack(ctx.defense, acfg)(x, y, generator=gen)
        c = (single_shot(ctx.defense, r.x_adv, y, noise=r.noise) if mode == "dwbox"
             else expected_correct(ctx.defense, r.x_adv, y, max(cfg.k, 1), generator=gen))
        res["points"][key] = {"acc": float(c.float().mean()), "ci95": list(mean_interval(c.float())), "n": len(y),
                              "steps": st, "eot": k, "mode": mode, "threat_model": tm, "norm": norm, "eps": eps}
        state.write_json(f, res)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode, xs, xl in ((axes[0], "dwbox", steps, "PGD steps (DW-box)"),
                             (axes[1], "eot", eots, f"EoT samples (stochastic, PGD-{cfg.steps})")):
        for tm, norm, eps, _ in groups:
            pts = [res["points"][f"{tm}:{norm}:{mode}:steps={st if mode == 'dwbox' else cfg.steps}:"
                                 f"eot={1 if mode == 'dwbox' else st}"] for st in xs]
            acc = [p["acc"] for p in pts]
            err = [[a - p["ci95"][0] for a, p in zip(acc, pts)], [p["ci95"][1] - a for a, p in zip(acc, pts)]]
            ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=f"{tm} {norm} eps={eps:.3g}")
        ax.set_xlabel(xl), ax.set_ylabel("robust accuracy (95% interval)"), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"gate convergence, n={len(y)} images, {ctx.defense.purifier.sampler} "
                 f"x{ctx.defense.purifier.n_unet_calls}")
    save_figure(fig, out / "convergence.png")
    return res


# ---- the whole run ---------------------------------------------------------------------------------------

def run(cfg: GateConfig) -> int:
    t0 = time.time()
    validate(cfg)
    use_deployed(cfg)
    d = distributed.setup(cfg.device)
    try:
        policy = load_policy()
        use_served_purification(cfg)
        private_key = signing.load_private_key() if cfg.gate else None
        baseline = None
        if cfg.gate and cfg.baseline_card:
            try:
                baseline = load_card(cfg.baseline_card)
            except CardError as e:
                raise GateError(str(e)) from None
        ctx = build(cfg, d)
        if cfg.report == "convergence":
            if d.is_main:
                convergence_report(ctx)
                print(f"convergence: {Path(cfg.out_dir) / 'convergence.png'}")
            return EXIT_PASS
        check_state(ctx, d)
        run_id = distributed.all_gather_object(uuid.uuid4().hex if d.is_main else None)[0]
        complete = wait_for_ranks(ctx, d, run_id, run_shard(ctx, d))
        if not d.is_main:
            return EXIT_PASS if complete else EXIT_INCOMPLETE
        if not complete:
            print(f"stopped before all {len(ctx.batches())} batches were evaluated; per-sample results are in "
                  f"{ctx.state}. Rerun the same command to continue.", file=sys.stderr)
            return EXIT_INCOMPLETE
        m = merge(ctx)
        with torch.no_grad():
            randomized = is_randomized(ctx.defense, ctx.x[:4].to(ctx.device),
                                       generator=torch.Generator(device=ctx.device).manual_seed(cfg.seed))
        checks = sanity(ctx, m) if cfg.sanity_n else None
        card = build_card(ctx, m, randomized, checks, policy, time.time() - t0, d.world_size)
        if baseline is not None:
            card["baseline"] = baseline_block(baseline, repository.relative_path(cfg.baseline_card))
        if cfg.gate:  # a cache of the verdict: export and the server recompute it from the evidence
            card["gate"] = evaluate(card, policy)
            if private_key is not None:
                card = signing.sign(card, private_key)
            else:
                print(f"warning: {signing.SIGNING_KEY_ENV} is not set: the card is not signed and cannot be "
                      f"exported", file=sys.stderr)
        else:
            card["gate"] = {"passed": False, "reasons": ["gate not evaluated (--gate false)"]}
        write_outputs(ctx, card, m)
        print(summary_table(card))
        if cfg.gate:
            print("\n".join(summary_lines(card["gate"])))
        print(f"card: {Path(cfg.out_dir) / 'card.json'}")
        if not cfg.gate:
            return EXIT_PASS
        if card["gate"]["passed"]:
            print("GATE PASSED")
            return EXIT_PASS
        print("GATE FAILED:\n  " + "\n  ".join(card["gate"]["reasons"]), file=sys.stderr)
        return EXIT_FAIL
    finally:
        distributed.teardown()

