"""Robustness cards: the JSON a gate run writes, and the checks export and the server run before using one.

A card binds its accuracies to exact weights through the sha256 of each checkpoint's served weights
file (`dbp.checkpoint.weights_sha256`), of its `meta.json` (the architecture; optimizer state left out, as
export drops it) and to the purification settings it was measured with (t*, sampler, steps), so a card
written for one model, or for other serving settings, cannot wave another one through (`card_bound_to`).

Whether a card passes is never read from it: `card_passes_for` verifies the gate's signature and recomputes
the verdict from the card's per-image evidence under the pinned policy (`dbp.gate.verdict.verify`).

  card = load_card("runs/gate/card.json")
  ok, reason = card_passes(card, "model_repository/purifier/3/weights", "model_repository/classifier/3/weights")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import hashlib

from . import state
from .checkpoint import CheckpointError, weights_sha256

from .gate.verdict import SCHEMA, VerdictError, verify
# the settings a card is bound to: a serving profile's keys (torch-free contract, shared with the gateway)
from .serving.contract import PROFILE_KEYS as PURIFICATION_KEYS

OLD_SCHEMAS = ("dbp.robustness_card/1", "dbp.robustness_card/2")  # readable (summaries, legacy), never passing


class CardError(ValueError):
    """A card file is missing, unreadable or not a robustness card; the message names the problem."""


def load_card(path: str | Path) -> dict[str, Any]:
    """Read and minimally validate a card (schema tag, model hashes, gate block)."""
    return read_card(path)[0]


def read_card(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """load_card, and the exact bytes the card was parsed from: the server hashes what it checked, never a second
    read of a file that may have changed meanwhile (dbp.repository.check_version)."""
    path = Path(path)
    if path.is_dir():
        path = path / "card.json"
    if not path.exists():
        raise CardError(f"no robustness card at {path}")
    try:
        raw = path.read_bytes()
        card = json.loads(raw)
    except (OSError, ValueError) as e:
        raise CardError(f"cannot read robustness card {path}: {e}") from e
    problem = _schema_problem(card)
    if problem:
        raise CardError(f"{path} is not a valid robustness card: {problem}")
    return card, raw


def _schema_problem(card: Any) -> str | None:
    if not isinstance(card, dict):
        return "top level is not a JSON object"
    if card.get("schema") not in (SCHEMA, *OLD_SCHEMAS):
        return f"schema is {card.get('schema')!r}, expected {SCHEMA!r}"
    model = card.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) and model.get(k)
                                              for k in ("purifier_sha256", "classifier_sha256")):
        return "model.purifier_sha256 / model.classifier_sha256 missing"
    gate = card.get("gate")
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        return "gate.passed missing or not a boolean"
    if not isinstance(card.get("settings"), list):
        return "settings missing or not a list"
    return None


def card_passes(card: Mapping[str, Any] | str | Path, purifier_dir: str | Path,
                classifier_dir: str | Path) -> tuple[bool, str]:
    """True only if the card's gate passed AND it was computed on exactly these weights.

    Never raises for a bad card or missing weights: the caller (export) needs a reason to print.
    """
    return card_passes_for(card, {"purifier": purifier_dir, "classifier": classifier_dir})


def card_passes_for(card: Mapping[str, Any] | str | Path, weights: Mapping[str, str | Path],
                    purification: Optional[Mapping[str, Any]] = None, *,
                    baseline: Optional[Mapping[str, str]] = None) -> tuple[bool, str]:
    """card_passes for some of the roles: {role: weights dir}. A served version dir holds one role only.

    `purification`: the settings the caller will run (the server's config.pbtxt); they must be the card's.
    `baseline`: {"purifier_sha256", "classifier_sha256"} of the deployed version, which the card must have been
    compared with (export passes it; the server, which serves what export let through, does not).
    """
    failures, v = _failures(card, weights, purification, baseline)
    if failures:
        return False, "; ".join(failures)
    card = _as_card(card)
    return True, (f"signed by {v['signed_by']}, passes the pinned policy {v['policy_sha256'][:12]}: "
                  + ", ".join(_summary(s) for s in card["settings"]))


def card_failures(card: Mapping[str, Any] | str | Path, weights: Mapping[str, str | Path],
                  purification: Optional[Mapping[str, Any]] = None, *,
                  baseline: Optional[Mapping[str, str]] = None) -> list[str]:
    """Every check of card_passes_for the card fails, in its order (binding, signature and pinned policy, the
    served VOTES, the baseline), the pinned policy's one item per failed rule; [] exactly when card_passes_for
    passes. What a legacy entry lists as its failed_rules. A card that cannot be read or is not a robustness card
    fails that check alone."""
    return _failures(card, weights, purification, baseline, per_rule=True)[0]


def _failures(card, weights, purification, baseline, per_rule: bool = False) -> tuple[list[str], Optional[dict]]:
    if not isinstance(card, Mapping):
        try:
            card = load_card(card)
        except CardError as e:
            return [str(e)], None
    problem = _schema_problem(card)
    if problem:
        return [f"invalid robustness card: {problem}"], None
    failures = []
    ok, reason = card_bound_to(card, weights, purification)
    if not ok:
        failures.append(reason)
    v = None
    try:
        v = verify(card)
    except VerdictError as e:
        failures.extend([str(r) for r in e.reasons] if per_rule and e.reasons else [str(e)])
    attacked = (card.get("served_votes") or {}).get("max") if isinstance(card.get("served_votes"), Mapping) else None
    served_votes = int((purification or {}).get("max_votes") or 1)
    # only the default (1) and the maximum are attacked: robustness at 16 votes says nothing about 4
    if served_votes > 1 and attacked != served_votes:
        failures.append(f"the server allows up to {served_votes} VOTES but the card attacked {attacked} as the "
                        f"maximum: gate it with --votes {served_votes}, or set max_votes in config.pbtxt to {attacked}"
                        if attacked is not None else
                        f"the server allows up to {served_votes} VOTES but the card does not say which maximum it "
                        f"attacked (a card older than served_votes): gate it with --votes {served_votes}")
    if baseline is not None:
        b = card.get("baseline") if isinstance(card.get("baseline"), Mapping) else {}
        if any(b.get(k) != baseline.get(k) for k in ("purifier_sha256", "classifier_sha256")):
            failures.append("the card's baseline is not the deployed version (its weights differ): re-run the gate "
                            "with --baseline_card of the deployed version, measured with the same protocol")
    return failures, v


def _as_card(card):
    return card if isinstance(card, Mapping) else load_card(card)


def card_bound_to(card: Mapping[str, Any] | str | Path, weights: Mapping[str, str | Path],
                  purification: Optional[Mapping[str, Any]] = None) -> tuple[bool, str]:
    """The card was computed on exactly these weights, meta.json and purification settings; says nothing about
    whether it passes (`card_passes_for` recomputes that)."""
    if not isinstance(card, Mapping):
        try:
            card = load_card(card)
        except CardError as e:
            return False, str(e)
    problem = _schema_problem(card)
    if problem:
        return False, f"invalid robustness card: {problem}"
    for role, d in weights.items():
        try:
            actual = weights_sha256(d)
        except (CheckpointError, OSError) as e:
            return False, f"cannot hash the {role} weights in {d}: {e}"
        expected = card["model"][f"{role}_sha256"]
        if actual != expected:
            return False, (f"{role} weights in {d} (sha256 {actual[:12]}...) are not the weights the card was "
                           f"computed on (sha256 {expected[:12]}...)")
        want_meta = card["model"].get(f"{role}_meta_sha256")
        if card.get("schema") not in OLD_SCHEMAS[:1]:
            have_meta = meta_sha256(d)
            if want_meta != have_meta:
                return False, (f"{role} meta.json in {d} (sha256 {str(have_meta)[:12]}...) is not the architecture "
                               f"the card was computed on (sha256 {str(want_meta)[:12]}...)")
    if purification is not None:
        mine = (card["model"].get("purification") or {})
        diff = [f"{k}: served {purification.get(k)!r} vs card {mine.get(k)!r}" for k in PURIFICATION_KEYS
                if str(purification.get(k)) != str(mine.get(k))]
        if diff:
            return False, ("the purification settings served are not the ones the card was measured with ("
                           + ", ".join(diff) + "): re-run the gate with the served settings")
    if card.get("schema") not in OLD_SCHEMAS[:1] and card.get("binding") != binding_sha256(card):
        return False, "card binding hash does not match its model block (the card was edited)"
    return True, "bound to these weights"


def meta_sha256(ckpt_dir: str | Path) -> Optional[str]:
    """sha256 of a checkpoint's meta.json as served: canonical JSON without the optimizer state."""
    f = Path(ckpt_dir) / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(meta, dict):
        meta.pop("optimizer", None)
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def binding_sha256(card: Mapping[str, Any]) -> str:
    """One hash over what the card is bound to: weights, meta.json and purification settings of both roles."""
    m = card.get("model") or {}
    keys = ("purifier_sha256", "classifier_sha256", "purifier_meta_sha256", "classifier_meta_sha256")
    pur = m.get("purification") or {}
    payload = {**{k: m.get(k) for k in keys}, "purification": {k: pur.get(k) for k in PURIFICATION_KEYS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _summary(s: Mapping[str, Any]) -> str:
    robust = (s.get("worst_case") or s.get("robust") or {}).get("acc")
    name = s.get("name", "?")
    return f"{name} robust {robust:.1%}" if isinstance(robust, (int, float)) else name


def write_card(card: Mapping[str, Any], path: str | Path) -> Path:
    """Atomic write (temp file + rename) so a reader never sees half a card."""
    return state.write_json(path, card, default=_json_default, fsync=True, newline=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- figures -------------------------------------------------------------------------------------------

def plot_card(card: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """accuracy.png (grouped by threat model: clean, DW-box, stochastic EoT, bare) and loss.png."""
    from .plots import _plt, line_plot, save_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    def group(s):
        return (s.get("threat_model_name", "paper"), s["threat_model"])
    norms = list(dict.fromkeys(group(s) for s in card["settings"]))
    by = {(*group(s), s["mode"]): s for s in card["settings"]}
    series: dict[str, list[tuple[float, float, float] | None]] = {}

    def add(label: str, norm_idx: int, stat: Mapping[str, Any] | None) -> None:
        series.setdefault(label, [None] * len(norms))
        if stat:
            series[label][norm_idx] = (stat["acc"], *stat["ci95"])

    bare = card.get("bare_robust", {})
    for i, g in enumerate(norms):
        add("clean (purified)", i, card["clean"]["purified"])
        add("DW-box (min over attacks)", i, (by.get((*g, "dwbox")) or {}).get("worst_case")
            or (by.get((*g, "dwbox")) or {}).get("robust"))
        add("white-box EoT, single-shot (min over attacks)", i, (by.get((*g, "eot")) or {}).get("worst_case")
            or (by.get((*g, "eot")) or {}).get("robust"))
        add("white-box EoT, expected", i, (by.get((*g, "eot")) or {}).get("robust_expected"))
        add("bare classifier under PGD", i, bare.get(f"{g[0]}:{g[1]}") or bare.get(g[1]))
    series = {k: v for k, v in series.items() if any(v)}

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(norms) + 2), 4.8))
    width = 0.8 / max(1, len(series))
    for j, (label, vals) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(norms))]
        acc = [v[0] if v else 0.0 for v in vals]
        err = [[(v[0] - v[1]) if v else 0.0 for v in vals], [(v[2] - v[0]) if v else 0.0 for v in vals]]
        ax.bar(xs, acc, width, yerr=err, capsize=3, label=label)
        for xx, v in zip(xs, vals):
            if v:
                ax.text(xx, v[0] + 0.01, f"{v[0]:.0%}", ha="center", va="bottom", fontsize=7)
    eps = {group(s): s["eps"] for s in card["settings"]}
    ax.set_xticks(range(len(norms)), [f"{g[0]} {g[1]} (eps={eps[g]:.4g})" for g in norms])
    ax.set_ylim(0, 1.1), ax.set_ylabel("accuracy (95% interval)")
    data = card.get("data", {})
    ax.set_title(f"{data.get('dataset', '')}, n={data.get('n', '?')}, "
                 f"{card['model']['purification']['sampler']} x{card['model']['purification']['unet_calls']}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    acc_path = save_figure(fig, out_dir / "accuracy.png")

    loss_path = line_plot({s["name"]: s["loss_trajectory"] for s in card["settings"] if s["loss_trajectory"]},
                          out_dir / "loss.png", xlabel="PGD step", ylabel="cross-entropy (mean over images)",
                          title="attack loss trajectory")
    return [acc_path, loss_path]
