"""Robustness cards: the JSON a gate run writes, and the check export runs before publishing weights.

A card binds its accuracies to exact weights through the sha256 of each checkpoint's served weights
file (`dbp.checkpoint.weights_sha256`), so a card written for one model cannot wave another one through.

  card = load_card("runs/gate/card.json")
  ok, reason = card_passes(card, "model_repository/purifier/3/weights", "model_repository/classifier/3/weights")
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import CheckpointError, weights_sha256

SCHEMA = "dbp.robustness_card/1"


class CardError(ValueError):
    """A card file is missing, unreadable or not a robustness card; the message names the problem."""


def load_card(path: str | Path) -> dict[str, Any]:
    """Read and minimally validate a card (schema tag, model hashes, gate block)."""
    path = Path(path)
    if path.is_dir():
        path = path / "card.json"
    if not path.exists():
        raise CardError(f"no robustness card at {path}")
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CardError(f"cannot read robustness card {path}: {e}") from e
    problem = _schema_problem(card)
    if problem:
        raise CardError(f"{path} is not a valid robustness card: {problem}")
    return card


def _schema_problem(card: Any) -> str | None:
    if not isinstance(card, dict):
        return "top level is not a JSON object"
    if card.get("schema") != SCHEMA:
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


def card_passes_for(card: Mapping[str, Any] | str | Path, weights: Mapping[str, str | Path]) -> tuple[bool, str]:
    """card_passes for some of the roles: {role: weights dir}. A served version dir holds one role only."""
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
    gate = card["gate"]
    if not gate["passed"]:
        reasons = "; ".join(gate.get("reasons") or []) or "no reason recorded"
        return False, f"robustness gate failed: {reasons}"
    return True, "gate passed: " + ", ".join(_summary(s) for s in card["settings"])


def _summary(s: Mapping[str, Any]) -> str:
    robust = (s.get("robust") or {}).get("acc")
    name = s.get("name", "?")
    return f"{name} robust {robust:.1%}" if isinstance(robust, (int, float)) else name


def write_card(card: Mapping[str, Any], path: str | Path) -> Path:
    """Atomic write (temp file + rename) so a reader never sees half a card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".card.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(card, f, indent=2, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- figures -------------------------------------------------------------------------------------------

def plot_card(card: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """accuracy.png (grouped by threat model: clean, DW-box, stochastic EoT, bare) and loss.png."""
    from .plots import _plt, line_plot

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norms = list(dict.fromkeys(s["threat_model"] for s in card["settings"]))
    by = {(s["threat_model"], s["mode"]): s for s in card["settings"]}
    series: dict[str, list[tuple[float, float, float] | None]] = {}

    def add(label: str, norm_idx: int, stat: Mapping[str, Any] | None) -> None:
        series.setdefault(label, [None] * len(norms))
        if stat:
            series[label][norm_idx] = (stat["acc"], *stat["ci95"])

    for i, nm in enumerate(norms):
        add("clean (purified)", i, card["clean"]["purified"])
        add("DW-box", i, (by.get((nm, "dwbox")) or {}).get("robust"))
        add("white-box EoT, single-shot", i, (by.get((nm, "eot")) or {}).get("robust"))
        add("white-box EoT, expected", i, (by.get((nm, "eot")) or {}).get("robust_expected"))
        add("bare classifier under PGD", i, card.get("bare_robust", {}).get(nm))
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
    eps = {s["threat_model"]: s["eps"] for s in card["settings"]}
    ax.set_xticks(range(len(norms)), [f"{nm} (eps={eps[nm]:.4g})" for nm in norms])
    ax.set_ylim(0, 1.1), ax.set_ylabel("accuracy (95% interval)")
    data = card.get("data", {})
    ax.set_title(f"{data.get('dataset', '')}, n={data.get('n', '?')}, "
                 f"{card['model']['purification']['sampler']} x{card['model']['purification']['unet_calls']}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    acc_path = out_dir / "accuracy.png"
    fig.savefig(acc_path, dpi=110)
    plt.close(fig)

    loss_path = line_plot({s["name"]: s["loss_trajectory"] for s in card["settings"] if s["loss_trajectory"]},
                          out_dir / "loss.png", xlabel="PGD step", ylabel="cross-entropy (mean over images)",
                          title="attack loss trajectory")
    return [acc_path, loss_path]
