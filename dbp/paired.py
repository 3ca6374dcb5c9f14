"""Paired comparison of two models on the SAME images with the SAME noise: McNemar's exact test and the
paired difference of accuracies with its 95% interval, plus the promotion verdict.

Why paired: two robust accuracies measured on the same images are strongly correlated (most images are
either easy or hard for both models), so comparing two independent intervals throws away most of the
power. Only the discordant images carry information about the difference.

Per-image outcomes are bound to what produced them by an `OutcomeRecord`: dataset, split, the attack
setting, the image indices, the per-image noise seed and the per-image boolean outcome, with a sha256
over all of it. Two records are comparable only if everything but the outcomes agrees;
`compare` refuses anything else with a `NotComparableError` naming the first mismatch.

API (pure functions, torch-free):

  rec = OutcomeRecord.build(outcomes, indices=idx, seeds=seed, dataset="fashion_mnist", split="test",
                            setting="linf-dwbox")          # seeds: one int for all images, or one per image
  rec.to_dict() / OutcomeRecord.from_dict(d)                # JSON form for cards; from_dict checks the digest
  check_comparable(candidate, baseline)                     # raises NotComparableError
  res = compare(candidate, baseline, alpha=0.05)            # -> PairedComparison
  res.verdict      # "significantly_better" | "not_significantly_different" | "significantly_worse"
  res.promotable   # True unless significantly worse (the gate's rule: promotion needs "not worse")
  res.to_dict()    # table (a, b, c, d), accuracies, diff, ci95, p_value, method, alpha, verdict, digests
  paired_scores(a, b)  # per-image SCORES instead of booleans (EoT expected accuracy): mean difference,
                       # normal interval, sign-flip permutation p-value

Statistics (a 2x2 table of candidate vs baseline outcomes, a = both right, b = only the candidate right,
c = only the baseline right, d = both wrong, n = a + b + c + d):
  - McNemar's exact test: under H0 (equal accuracies) b ~ Binomial(b + c, 1/2); two-sided
    p = min(1, 2 * P(X <= min(b, c))), computed exactly with integers (math.comb). p = 1 when b + c = 0.
  - difference of accuracies D = (b - c) / n with Newcombe's hybrid score interval for paired proportions
    (Newcombe 1998, Stat Med 17:2635): Wilson intervals of the two marginal accuracies combined with the
    phi correlation of the table (phi = 0 when a margin is empty); continuity-corrected (method 11) by
    default, method 10 with continuity=False.
  - verdict: the exact test decides significance at `alpha`; the sign of b - c gives its direction. The
    interval is reported beside it (it is not a test inversion of McNemar's, so at the boundary the two
    can disagree; the verdict follows the test).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from .stats import Z95, wilson

VERDICTS = ("significantly_better", "not_significantly_different", "significantly_worse")
METHOD = {"test": "McNemar exact (two-sided binomial on discordant pairs)",
          "interval": "Newcombe hybrid score interval for paired proportions, continuity-corrected (method 11)"}


class NotComparableError(ValueError):
    """Two outcome records do not describe the same images, seeds and setting."""


# ---- records -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutcomeRecord:
    """Per-image boolean outcomes bound to the images, noise seeds and setting that produced them."""

    dataset: str
    split: str
    setting: str  # e.g. "linf-dwbox eps=0.0314 PGD-20"; free-form, must match exactly to compare
    indices: tuple[int, ...]
    seeds: tuple[int, ...]  # the noise seed of each image (DW-box: the seed of its fixed noise draw)
    outcomes: tuple[bool, ...]
    sha256: str = ""

    @classmethod
    def build(cls, outcomes: Iterable, *, indices: Iterable[int], seeds: Union[int, Iterable[int]], dataset: str,
              split: str, setting: str) -> "OutcomeRecord":
        """Outcomes may be bools, 0/1 numbers or a torch bool/float tensor of 0/1."""
        outs = tuple(_as_bool(v) for v in _flat(outcomes))
        idx = tuple(int(i) for i in _flat(indices))
        sds = (int(seeds),) * len(outs) if isinstance(seeds, int) else tuple(int(s) for s in _flat(seeds))
        if not (len(outs) == len(idx) == len(sds)):
            raise ValueError(f"outcomes, indices and seeds must have one entry per image, got {len(outs)}, "
                             f"{len(idx)} and {len(sds)}")
        if len(set(idx)) != len(idx):
            raise ValueError("indices repeat an image: each image may appear once in a record")
        rec = cls(str(dataset), str(split), str(setting), idx, sds, outs)
        return cls(rec.dataset, rec.split, rec.setting, idx, sds, outs, rec.digest())

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def accuracy(self) -> float:
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else float("nan")

    def digest(self) -> str:
        """sha256 over everything the record claims; a changed outcome, index or seed changes it."""
        payload = json.dumps({"dataset": self.dataset, "split": self.split, "setting": self.setting,
                              "indices": list(self.indices), "seeds": list(self.seeds),
                              "outcomes": "".join("1" if o else "0" for o in self.outcomes)},
                             sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def verify(self) -> None:
        if self.sha256 != self.digest():
            raise NotComparableError(f"outcome record of {self.setting!r} fails its sha256 check (stored "
                                     f"{self.sha256[:12] or 'none'}, content {self.digest()[:12]}): it was edited "
                                     f"or built without OutcomeRecord.build")

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "setting": self.setting,
                "indices": list(self.indices), "seeds": _compact_seeds(self.seeds),
                "outcomes": "".join("1" if o else "0" for o in self.outcomes), "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "OutcomeRecord":
        try:
            idx = tuple(int(i) for i in d["indices"])
            seeds = d["seeds"]
            sds = (int(seeds),) * len(idx) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
            outs_raw = d["outcomes"]
            if isinstance(outs_raw, str):
                if set(outs_raw) - {"0", "1"}:
                    raise ValueError("outcomes string may hold only '0' and '1'")
                outs = tuple(c == "1" for c in outs_raw)
            else:
                outs = tuple(_as_bool(v) for v in outs_raw)
            rec = cls(str(d["dataset"]), str(d["split"]), str(d["setting"]), idx, sds, outs, str(d["sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            raise NotComparableError(f"malformed outcome record: {e!r}") from None
        if not (len(rec.outcomes) == len(rec.indices) == len(rec.seeds)):
            raise NotComparableError(f"malformed outcome record: {len(rec.outcomes)} outcomes, "
                                     f"{len(rec.indices)} indices, {len(rec.seeds)} seeds")
        rec.verify()
        return rec


def check_comparable(candidate: OutcomeRecord, baseline: OutcomeRecord) -> None:
    """Raise NotComparableError unless both records cover the same images, seeds and setting, in order."""
    for rec, who in ((candidate, "candidate"), (baseline, "baseline")):
        try:
            rec.verify()
        except NotComparableError as e:
            raise NotComparableError(f"{who}: {e}") from None
    for field in ("dataset", "split", "setting"):
        a, b = getattr(candidate, field), getattr(baseline, field)
        if a != b:
            raise NotComparableError(f"not a paired comparison: {field} differs (candidate {a!r}, baseline {b!r})")
    if len(candidate) != len(baseline):
        raise NotComparableError(f"not a paired comparison: the candidate has {len(candidate)} images, the "
                                 f"baseline {len(baseline)}")
    if not candidate.outcomes:
        raise NotComparableError("not a paired comparison: the records hold no images")
    for field in ("indices", "seeds"):
        a, b = getattr(candidate, field), getattr(baseline, field)
        if a != b:
            pos = next(i for i, (u, v) in enumerate(zip(a, b)) if u != v)
            what = "image index" if field == "indices" else "noise seed"
            raise NotComparableError(f"not a paired comparison: {what} differs at position {pos} (candidate "
                                     f"{a[pos]}, baseline {b[pos]}); evaluate both models on the same images "
                                     f"with the same seeds")


# ---- statistics ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedTable:
    a: int  # both right
    b: int  # only the candidate right
    c: int  # only the baseline right
    d: int  # both wrong

    @property
    def n(self) -> int:
        return self.a + self.b + self.c + self.d

    @classmethod
    def from_outcomes(cls, candidate: Sequence[bool], baseline: Sequence[bool]) -> "PairedTable":
        if len(candidate) != len(baseline):
            raise ValueError(f"paired outcomes need equal lengths, got {len(candidate)} and {len(baseline)}")
        cnt = [0, 0, 0, 0]
        for u, v in zip(candidate, baseline):
            cnt[(0 if u else 2) + (0 if v else 1)] += 1  # (T,T) a, (T,F) b, (F,T) c, (F,F) d
        return cls(*cnt)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / (1 << m))  # int / int: correctly rounded however large m is


def mcnemar_one_sided(b: int, c: int) -> float:
    """One-sided exact McNemar p-value for "the candidate is better": P(Binomial(b + c, 1/2) >= b)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    return sum(math.comb(m, i) for i in range(b, m + 1)) / (1 << m)


def wilson_cc(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval with continuity correction (Newcombe 1998a, method 4)."""
    if n <= 0:
        return (0.0, 1.0)
    p, zz = successes / n, z * z
    lo = 0.0 if successes == 0 else \
        (2 * n * p + zz - 1 - z * math.sqrt(zz - 2 - 1 / n + 4 * p * (n * (1 - p) + 1))) / (2 * (n + zz))
    hi = 1.0 if successes == n else \
        (2 * n * p + zz + 1 + z * math.sqrt(zz + 2 - 1 / n + 4 * p * (n * (1 - p) - 1))) / (2 * (n + zz))
    return (max(0.0, lo), min(1.0, hi))


def newcombe_interval(t: PairedTable, z: float = Z95, continuity: bool = True) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p_candidate - p_baseline on a paired table.

    continuity=True is Newcombe's method 11 (continuity-corrected Wilson limits and phi), the default
    because it agrees with the exact McNemar test far more often than method 10 (continuity=False), which
    has coverage closer to nominal but excludes 0 for tables the exact test calls not significant
    (e.g. b=4, c=0).
    """
    n = t.n
    if n == 0:
        return (-1.0, 1.0)
    p1, p2 = (t.a + t.b) / n, (t.a + t.c) / n
    ci = wilson_cc if continuity else wilson
    l1, u1 = ci(t.a + t.b, n, z)
    l2, u2 = ci(t.a + t.c, n, z)
    margins = (t.a + t.b) * (t.c + t.d) * (t.a + t.c) * (t.b + t.d)
    num = t.a * t.d - t.b * t.c
    if continuity and num > 0:
        num = max(num - n / 2, 0.0)
    phi = num / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    dl = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    du = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return (max(-1.0, diff - math.sqrt(max(dl, 0.0))), min(1.0, diff + math.sqrt(max(du, 0.0))))


def verdict(p_value: float, b: int, c: int, alpha: float = 0.05) -> str:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if p_value >= alpha or b == c:
        return "not_significantly_different"
    return "significantly_better" if b > c else "significantly_worse"


@dataclass(frozen=True)
class PairedComparison:
    table: PairedTable
    acc_candidate: float
    acc_baseline: float
    diff: float  # acc_candidate - acc_baseline
    ci95: tuple[float, float]
    p_value: float
    alpha: float
    verdict: str
    candidate_sha256: str
    baseline_sha256: str
    setting: str

    @property
    def promotable(self) -> bool:
        """The gate's rule: a candidate may replace the baseline unless it is significantly worse."""
        return self.verdict != "significantly_worse"

    def to_dict(self) -> dict:
        t = self.table
        return {"setting": self.setting, "n": t.n, "table": {"both_right": t.a, "only_candidate_right": t.b,
                                                              "only_baseline_right": t.c, "both_wrong": t.d},
                "acc_candidate": self.acc_candidate, "acc_baseline": self.acc_baseline, "diff": self.diff,
                "ci95": list(self.ci95), "p_value": self.p_value, "alpha": self.alpha, "verdict": self.verdict,
                "promotable": self.promotable, "method": dict(METHOD),
                "candidate_sha256": self.candidate_sha256, "baseline_sha256": self.baseline_sha256}


def compare(candidate: OutcomeRecord, baseline: OutcomeRecord, alpha: float = 0.05) -> PairedComparison:
    """Paired comparison of two comparable records (raises NotComparableError otherwise)."""
    check_comparable(candidate, baseline)
    t = PairedTable.from_outcomes(candidate.outcomes, baseline.outcomes)
    p = mcnemar_exact(t.b, t.c)
    return PairedComparison(t, candidate.accuracy, baseline.accuracy, (t.b - t.c) / t.n, newcombe_interval(t), p,
                            alpha, verdict(p, t.b, t.c, alpha), candidate.sha256, baseline.sha256,
                            candidate.setting)


def paired_scores(candidate: Sequence[float], baseline: Sequence[float], draws: int = 100_000, seed: int = 0,
                  exact_up_to: int = 16) -> dict:
    """Paired difference of per-image SCORES (e.g. expected accuracy over k purifications, in [0, 1]).

    McNemar needs one boolean per image; an EoT card's expected accuracy gives a fraction per image instead.
    Reported: the mean difference, a normal 95% interval (mean +- 1.96 SE), and a two-sided sign-flip
    permutation p-value (under H0 each image's difference is symmetric around 0, so its sign is a coin):
    exact over all 2^n sign patterns for n <= exact_up_to, else `draws` seeded Monte Carlo patterns
    (p = (hits + 1) / (draws + 1), never 0). Seeded, so a committed table reproduces.
    """
    a, b = [float(v) for v in _flat(candidate)], [float(v) for v in _flat(baseline)]
    if len(a) != len(b):
        raise ValueError(f"paired scores need one value per image in both, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"paired scores need at least 2 images, got {len(a)}")
    if not all(math.isfinite(v) for v in a + b):
        raise ValueError("paired scores must be finite numbers")
    d = [u - v for u, v in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    tol = 1e-12
    if n <= exact_up_to:
        hits = sum(abs(sum(x if (m >> i) & 1 else -x for i, x in enumerate(d))) / n >= abs(mean) - tol
                   for m in range(1 << n))
        p, how = hits / (1 << n), f"exact over all {1 << n} sign patterns"
    else:
        import torch  # only for the Monte Carlo draws; the paired module needs no torch otherwise
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (draws, n), generator=g, dtype=torch.float64) * 2 - 1
        null = (signs * torch.tensor(d, dtype=torch.float64)).mean(1).abs()
        p, how = float(((null >= abs(mean) - tol).sum() + 1) / (draws + 1)), f"{draws} seeded draws"
    return {"n": n, "diff": mean, "ci95": [mean - Z95 * se, mean + Z95 * se], "p_value": min(1.0, p),
            "method": f"paired mean difference of per-image scores; normal interval; sign-flip permutation "
                      f"test, {how}"}


def paired_hits(candidate_hits: Sequence[int], baseline_hits: Sequence[int], k: int) -> dict:
    """`paired_scores` for per-image hits out of k (an EoT card's expected accuracy), with an EXACT sign-flip
    p-value at any n: the per-image differences are integers, so the null distribution of their signed sum is
    a convolution over integer offsets (numpy, no random draws: the server and the gateway recompute it and
    must get the same number on every machine)."""
    import numpy as np

    hc, hb = [int(h) for h in _flat(candidate_hits)], [int(h) for h in _flat(baseline_hits)]
    if k < 1 or len(hc) != len(hb) or len(hc) < 2:
        raise ValueError(f"paired hits need k >= 1 and the same number (>= 2) of images, got k={k}, "
                         f"{len(hc)} and {len(hb)}")
    if not all(0 <= h <= k for h in hc + hb):
        raise ValueError(f"hits must lie in [0, {k}]")
    d = [a - b for a, b in zip(hc, hb)]
    n, total = len(d), sum(abs(v) for v in d)
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0
    for m in (abs(v) for v in d if v):
        dist = 0.5 * (np.roll(dist, m) + np.roll(dist, -m))  # no wrap-around: |sum| never exceeds total
    observed = abs(sum(d))
    offsets = np.abs(np.arange(-total, total + 1))
    p = float(dist[offsets >= observed].sum())
    mean = sum(d) / n / k
    se = math.sqrt(sum((v / k - mean) ** 2 for v in d) / (n - 1) / n)
    return {"n": n, "k": k, "diff": mean, "ci95": [mean - Z95 * se, mean + Z95 * se], "p_value": min(1.0, p),
            "method": "paired mean difference of per-image expected accuracy (hits/k); normal interval; exact "
                      "sign-flip permutation test (convolution over integer differences)"}


# ---- helpers ---------------------------------------------------------------------------------------------

def _flat(values) -> list:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().flatten().tolist()
    return list(values)


def _as_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    f = float(v)
    if f not in (0.0, 1.0):
        raise ValueError(f"per-image outcomes must be 0/1 or booleans, got {v!r}")
    return f == 1.0


def _compact_seeds(seeds: tuple[int, ...]):
    """One int when every image shares the seed (the learning curve's single noise draw), else the list."""
    return seeds[0] if seeds and all(s == seeds[0] for s in seeds) else list(seeds)
