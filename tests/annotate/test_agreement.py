"""Agreement metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from alignforge.annotate.agreement import (
    aspect_agreement,
    bootstrap_weights,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
)

# rater 1 x rater 2 over 10 items (A = a better, T = tie, B = b better):
#            r2: A  T  B
#   r1 = A       4  1  0     r1 marginals A 5, T 2, B 3
#   r1 = T       0  2  0     r2 marginals A 5, T 3, B 2
#   r1 = B       1  0  2
R1 = ["A"] * 4 + ["A"] + ["T"] * 2 + ["B"] + ["B"] * 2
R2 = ["A"] * 4 + ["T"] + ["T"] * 2 + ["A"] + ["B"] * 2


def test_cohen_kappa_by_hand_with_ties():
    """p_o = (4 + 2 + 2) / 10 = 0.8
    p_e = (5*5 + 2*3 + 3*2) / 100 = 0.37
    kappa = (0.8 - 0.37) / (1 - 0.37) = 0.43 / 0.63 = 0.682539..."""
    assert cohen_kappa(R1, R2) == pytest.approx(0.43 / 0.63)


def test_cohen_kappa_by_hand_without_ties():
    """Drop the 3 items where either rater said T: 7 left, table A-A 4, B-A 1, B-B 2.
    p_o = 6/7; r1 marginals A 4, B 3; r2 marginals A 5, B 2
    p_e = (4*5 + 3*2) / 49 = 26/49
    kappa = (42/49 - 26/49) / (23/49) = 16/23 = 0.695652..."""
    keep = [i for i in range(10) if "T" not in (R1[i], R2[i])]
    assert len(keep) == 7
    assert cohen_kappa([R1[i] for i in keep], [R2[i] for i in keep]) == pytest.approx(16 / 23)


def test_cohen_kappa_edge_cases():
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    # perfect disagreement on a balanced table: p_o = 0, p_e = 0.5 -> -1
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"]))  # p_e = 1: undefined
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def test_krippendorff_alpha_nominal_by_hand_with_missing_values():
    """Raters x units (None = missing):
        r1: a a b a
        r2: a b b -
        r3: a - - -
    unit 4 has one value and is not pairable.
    Coincidences, each ordered pair in unit u weighted 1/(m_u - 1):
        unit 1 (a,a,a; m=3): 6 pairs (a,a) / 2 -> o_aa += 3
        unit 2 (a,b; m=2):   o_ab += 1, o_ba += 1
        unit 3 (b,b; m=2):   o_bb += 2
    n_a = 3 + 1 = 4, n_b = 1 + 2 = 3, n = 7
    alpha = 1 - (n - 1) * (o_ab + o_ba) / (n_a n_b + n_b n_a) = 1 - 6 * 2 / 24 = 0.5"""
    m = [["a", "a", "b", "a"], ["a", "b", "b", None], ["a", None, None, None]]
    assert krippendorff_alpha(m) == pytest.approx(0.5)


def test_krippendorff_alpha_published_example():
    """Krippendorff (2011), 'Computing Krippendorff's alpha-reliability', nominal example with
    4 observers, 12 units and missing values: alpha = 0.743."""
    n = None
    m = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    assert krippendorff_alpha(m) == pytest.approx(0.743, abs=5e-4)


def test_alpha_perfect_and_degenerate():
    assert krippendorff_alpha([["a", "b"], ["a", "b"]]) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha([["a", "a"], ["a", "a"]]))
    assert math.isnan(krippendorff_alpha([["a", None], [None, "b"]]))


SCORE = {"A": 1, "T": 0, "B": -1}


def test_aspect_agreement_with_and_without_ties():
    """Two raters, the 10-item table above; a third rater on item 0 only, and an item with a
    single rating that must not count."""
    lab = {i: {"r1": SCORE[R1[i]], "r2": SCORE[R2[i]]} for i in range(10)}
    lab[0]["r3"] = 1
    lab[99] = {"r1": 1}
    with_t = aspect_agreement(lab, "entities", ties=True)
    assert with_t.n_items == 10
    pair = next(p for p in with_t.pairs if (p.rater1, p.rater2) == ("r1", "r2"))
    assert pair.kappa == pytest.approx(0.43 / 0.63) and pair.n_items == 10
    assert all(p.rater1 != "r3" and p.rater2 != "r3" for p in with_t.pairs)  # 1 common item < 2
    no_t = aspect_agreement(lab, "entities", ties=False)
    assert no_t.n_items == 7
    assert no_t.pairs[0].kappa == pytest.approx(16 / 23)
    assert no_t.mean_kappa == pytest.approx(16 / 23)


def test_without_ties_is_decided_per_rater_pair():
    """50 raters; on every item one of them says tie and the others agree. Dropping every item
    with any tie would leave nothing; per pair, only the pairs involving the tie go."""
    rng = np.random.default_rng(0)
    lab = {}
    for i in range(40):
        side = 1 if i % 2 else -1
        lab[i] = {f"r{r:02d}": side for r in range(50)}
        lab[i][f"r{rng.integers(50):02d}"] = 0
    no_t = aspect_agreement(lab, "overall", ties=False)
    assert no_t.n_items == 40
    assert no_t.alpha == pytest.approx(1.0) and no_t.mean_kappa == pytest.approx(1.0)
    assert no_t.fleiss == pytest.approx(1.0)
    assert aspect_agreement(lab, "overall", ties=True).alpha < 1.0


def test_fleiss_kappa_published_example():
    """Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories.
    P = 0.378, P_e = 0.213, kappa = (0.378 - 0.213) / (1 - 0.213) = 0.210."""
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    # two raters: Fleiss' kappa is Scott's pi, which equals alpha up to the n / (n - 1) factor
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[2, 0], [3, 0]]))


def _random_reliability(rng, n_raters, n_units, values, p_missing):
    m = rng.choice(values, size=(n_raters, n_units)).astype(float)
    m[rng.random(m.shape) < p_missing] = np.nan
    return m


@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_alpha_equals_the_krippendorff_package(level):
    kd = pytest.importorskip("krippendorff")
    rng = np.random.default_rng(1)
    for trial in range(20):
        data = _random_reliability(rng, 2 + trial % 5, 5 + 3 * trial, [-2, -1, 0, 1, 2], 0.3)
        # correlated raters: half the units copy rater 0 with a one-step jitter
        data[1:, ::2] = np.clip(data[0, ::2] + rng.integers(-1, 2, data[1:, ::2].shape), -2, 2)
        ours = krippendorff_alpha(
            [[None if np.isnan(v) else int(v) for v in row] for row in data], level=level
        )
        theirs = kd.alpha(reliability_data=data, level_of_measurement=level)
        assert ours == pytest.approx(theirs, abs=1e-12), (trial, level)


def test_ordinal_alpha_credits_near_misses_on_the_five_point_scale():
    """Two raters always agree on the direction but one says 'much better' where the other says
    'better': nominal alpha treats that as disagreement, ordinal alpha as a near miss."""
    kd = pytest.importorskip("krippendorff")
    r1 = [2, 1, -1, -2, 2, 1, -1, -2, 0, 0]
    r2 = [1, 2, -2, -1, 1, 2, -2, -1, 0, 0]
    nominal = krippendorff_alpha([r1, r2], "nominal")
    ordinal = krippendorff_alpha([r1, r2], "ordinal")
    assert nominal < 0.1 and ordinal > 0.7
    assert ordinal == pytest.approx(kd.alpha(reliability_data=[r1, r2],
                                             level_of_measurement="ordinal"), abs=1e-12)  # fmt: skip
    scores = {i: {"r1": a, "r2": b} for i, (a, b) in enumerate(zip(r1, r2, strict=True))}
    got = aspect_agreement(scores, "entities", level="ordinal")
    assert got.alpha == pytest.approx(ordinal) and got.mean_kappa == pytest.approx(1.0)


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_items():
    rng = np.random.default_rng(2)

    def noisy(n):
        truth = rng.choice([-1, 1], n)
        return {i: {f"r{r}": int(truth[i] if rng.random() < 0.8 else -truth[i]) for r in range(3)}
                for i in range(n)}  # fmt: skip

    widths = []
    for n in (30, 600):
        scores = noisy(n)
        w = bootstrap_weights(n, 1000, seed=0)
        got = aspect_agreement(scores, "x", weights=w, item_order=sorted(scores))
        assert got.alpha_lo < got.alpha < got.alpha_hi
        widths.append(got.alpha_hi - got.alpha_lo)
    assert widths[1] < widths[0] / 2
