"""Paired comparison statistics (dbp.paired): McNemar exact, Newcombe interval, records bound to images+seeds."""
import math
import random

import pytest

from dbp.paired import (NotComparableError, OutcomeRecord, PairedTable, check_comparable, compare, mcnemar_exact,
                        newcombe_interval, paired_scores)

IDX = list(range(1024, 1024 + 200))


def rec(outcomes, indices=None, seeds=7, setting="linf-dwbox", dataset="fashion_mnist", split="test"):
    return OutcomeRecord.build(outcomes, indices=IDX[:len(outcomes)] if indices is None else indices, seeds=seeds,
                               dataset=dataset, split=split, setting=setting)


def test_mcnemar_exact_matches_the_binomial_tail():
    # b=0, c=4: 2 * 0.5**4 = 0.125 (the pilot: ADDT won all 4 discordant images)
    assert mcnemar_exact(4, 0) == pytest.approx(0.125)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3, 7) == mcnemar_exact(7, 3)
    b, c = 13, 31
    manual = 2 * sum(math.comb(b + c, i) for i in range(b + 1)) / 2 ** (b + c)
    assert mcnemar_exact(b, c) == pytest.approx(manual, rel=1e-12)
    assert 0 < mcnemar_exact(600, 900) < 1e-10  # large counts: no overflow, tiny but positive
    stats = pytest.importorskip("scipy.stats")
    for b, c in ((0, 6), (2, 9), (17, 25), (40, 40)):
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_a_model_compared_with_itself_is_never_significantly_different():
    rng = random.Random(0)
    for n in (1, 8, 128, 200):
        for p in (0.0, 0.3, 0.5, 1.0):
            outs = [rng.random() < p for _ in range(n)]
            res = compare(rec(outs), rec(outs))
            assert res.verdict == "not_significantly_different" and res.promotable
            assert res.p_value == 1.0 and res.diff == 0.0
            assert res.ci95[0] <= 0.0 <= res.ci95[1]


def test_a_broken_candidate_is_significantly_worse_and_a_fixed_one_better():
    rng = random.Random(1)
    good = [rng.random() < 0.6 for _ in range(128)]
    res = compare(rec([False] * 128), rec(good))
    assert res.verdict == "significantly_worse" and not res.promotable
    assert res.p_value < 1e-10 and res.ci95[1] < 0
    assert res.diff == pytest.approx(-sum(good) / 128)
    back = compare(rec(good), rec([False] * 128))
    assert back.verdict == "significantly_better" and back.promotable and back.ci95[0] > 0
    d = res.to_dict()
    assert d["table"]["only_baseline_right"] == sum(good) and d["table"]["only_candidate_right"] == 0
    assert d["candidate_sha256"] == rec([False] * 128).sha256


def test_small_differences_are_not_significant():
    base = [True] * 30 + [False] * 34
    cand = [True] * 30 + [True] * 4 + [False] * 30  # the pilot: 4 discordant images, all for the candidate
    res = compare(rec(cand), rec(base))
    assert res.verdict == "not_significantly_different" and res.p_value == pytest.approx(0.125)
    assert res.ci95[0] < 0 < res.ci95[1]  # the continuity-corrected interval agrees with the exact test here
    # method 10 (no correction) excludes 0 on this very table: why the corrected one is the default
    assert newcombe_interval(res.table, continuity=False)[0] > 0


def test_newcombe_interval_regression_values():
    # a table with a zero cell (a=36, b=12, c=2, d=0), the kind Newcombe's paired paper works through
    lo, hi = newcombe_interval(PairedTable(36, 12, 2, 0), continuity=False)
    assert (round(lo, 4), round(hi, 4)) == (0.0569, 0.3404)
    lo_cc, hi_cc = newcombe_interval(PairedTable(36, 12, 2, 0))
    assert lo_cc < lo and hi_cc > hi  # the correction only widens
    lo0, hi0 = newcombe_interval(PairedTable(0, 0, 0, 10))  # both always wrong: empty margins, phi = 0
    assert -1 < lo0 < 0 < hi0 < 1


def test_mismatched_images_seeds_or_settings_are_refused():
    outs = [True, False, True, True]
    base = rec(outs)
    with pytest.raises(NotComparableError, match="image index differs at position 2"):
        compare(rec(outs, indices=[1024, 1025, 9, 1027]), base)
    with pytest.raises(NotComparableError, match="noise seed differs at position 0"):
        compare(rec(outs, seeds=8), base)
    with pytest.raises(NotComparableError, match="setting differs"):
        compare(rec(outs, setting="l2-dwbox"), base)
    with pytest.raises(NotComparableError, match="split differs"):
        compare(rec(outs, split="train"), base)
    with pytest.raises(NotComparableError, match="3 images, the baseline 4"):
        compare(rec(outs[:3]), base)
    with pytest.raises(ValueError, match="one entry per image"):
        OutcomeRecord.build(outs, indices=[1, 2, 3], seeds=0, dataset="d", split="test", setting="s")
    with pytest.raises(ValueError, match="repeat"):
        OutcomeRecord.build(outs, indices=[1, 1, 2, 3], seeds=0, dataset="d", split="test", setting="s")
    with pytest.raises(ValueError, match="0/1"):
        rec([0.5, 1, 0, 1])


def test_records_round_trip_and_a_tampered_record_is_refused():
    r = rec([True, False, True], seeds=[3, 4, 5])
    d = r.to_dict()
    assert d["outcomes"] == "101" and d["seeds"] == [3, 4, 5]
    assert OutcomeRecord.from_dict(d) == r
    assert rec([True, False]).to_dict()["seeds"] == 7  # a single shared seed is stored once
    assert OutcomeRecord.from_dict(rec([True, False]).to_dict()) == rec([True, False])
    flipped = dict(d, outcomes="111")
    with pytest.raises(NotComparableError, match="sha256"):
        OutcomeRecord.from_dict(flipped)
    with pytest.raises(NotComparableError, match="malformed"):
        OutcomeRecord.from_dict({"outcomes": "1"})
    forged = OutcomeRecord(r.dataset, r.split, r.setting, r.indices, r.seeds, (True, True, True), r.sha256)
    with pytest.raises(NotComparableError, match="candidate: .*sha256"):
        check_comparable(forged, r)
    torch = pytest.importorskip("torch")
    assert OutcomeRecord.build(torch.tensor([1.0, 0.0, 1.0]), indices=torch.arange(3), seeds=0, dataset="d",
                               split="test", setting="s").outcomes == (True, False, True)


def test_newcombe_interval_covers_the_true_difference_in_simulation():
    """Correlated paired outcomes with a known difference: the 95% interval covers it about 95% of the time."""
    rng = random.Random(2026)
    # cell probabilities (a, b, c, d): strong agreement, as between two purifiers on the same images
    probs = (0.50, 0.08, 0.03, 0.39)
    true_diff = probs[1] - probs[2]
    n, reps = 128, 600
    hits, widths = {True: 0, False: 0}, []
    for _ in range(reps):
        cnt = [0, 0, 0, 0]
        for _ in range(n):
            u, acc = rng.random(), 0.0
            for k, p in enumerate(probs):
                acc += p
                if u < acc:
                    cnt[k] += 1
                    break
            else:
                cnt[3] += 1
        for cc in (True, False):
            lo, hi = newcombe_interval(PairedTable(*cnt), continuity=cc)
            hits[cc] += lo <= true_diff <= hi
        widths.append(hi - lo)
    coverage = {cc: h / reps for cc, h in hits.items()}
    assert 0.93 <= coverage[False] <= 0.975, coverage
    assert coverage[False] <= coverage[True] <= 0.995, coverage
    # pairing pays: narrower than two independent Wilson intervals would allow (~ +-0.12 each at n=128)
    assert sum(widths) / reps < 0.16


def test_table_counts():
    t = PairedTable.from_outcomes([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (t.a, t.b, t.c, t.d, t.n) == (2, 1, 1, 1, 5)
    with pytest.raises(ValueError, match="equal lengths"):
        PairedTable.from_outcomes([1], [1, 0])


# ---- paired scores (per-image fractions, e.g. EoT expected accuracy) ----------------------------------------

def _exact_sign_flip_p(d):
    n, mean = len(d), abs(sum(d) / len(d))
    hits = 0
    for m in range(1 << n):
        hits += abs(sum(x if (m >> i) & 1 else -x for i, x in enumerate(d))) / n >= mean - 1e-12
    return hits / (1 << n)


def test_paired_scores_of_a_model_with_itself_are_never_different():
    r = random.Random(3)
    s = [r.choice([0.0, 0.1, 0.5, 0.9, 1.0]) for _ in range(40)]
    out = paired_scores(s, s)
    assert out["diff"] == 0.0 and out["p_value"] == 1.0 and out["ci95"] == [0.0, 0.0]


def test_paired_scores_exact_small_n_matches_full_enumeration_and_monte_carlo_agrees():
    r = random.Random(11)
    a = [r.random() for _ in range(12)]
    b = [x - 0.15 + 0.3 * r.random() for x in a]
    exact = paired_scores(a, b)
    assert "exact" in exact["method"]
    assert exact["p_value"] == pytest.approx(_exact_sign_flip_p([u - v for u, v in zip(a, b)]))
    mc = paired_scores(a, b, exact_up_to=0, draws=100_000)
    assert "draws" in mc["method"]
    assert mc["p_value"] == pytest.approx(exact["p_value"], abs=0.01)


def test_paired_scores_detect_a_consistent_shift_and_its_sign():
    r = random.Random(5)
    base = [r.random() * 0.8 for _ in range(64)]
    better = [x + 0.05 + 0.02 * r.random() for x in base]
    up = paired_scores(better, base)
    down = paired_scores(base, better)
    assert up["p_value"] < 1e-3 and up["diff"] > 0 and up["ci95"][0] > 0
    assert down["p_value"] < 1e-3 and down["diff"] < 0 and down["ci95"][1] < 0
    signs = [0.1] * 33 + [-0.1] * 31  # 33 up, 31 down: no effect to speak of
    r.shuffle(signs)
    noise = [x + s for x, s in zip(base, signs)]
    assert paired_scores(noise, base)["p_value"] > 0.5


def test_paired_scores_refuse_unpaired_or_bad_input():
    with pytest.raises(ValueError, match="one value per image"):
        paired_scores([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="at least 2"):
        paired_scores([0.1], [0.2])
    with pytest.raises(ValueError, match="finite"):
        paired_scores([0.1, float("nan")], [0.2, 0.3])
