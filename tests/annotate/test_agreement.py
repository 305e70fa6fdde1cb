"""Agreement metrics against values worked out by hand."""

import math

import pytest

from alignforge.annotate.agreement import (
    aspect_agreement,
    cohen_kappa,
    krippendorff_alpha_nominal,
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
    assert krippendorff_alpha_nominal(m) == pytest.approx(0.5)


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
    assert krippendorff_alpha_nominal(m) == pytest.approx(0.743, abs=5e-4)


def test_alpha_perfect_and_degenerate():
    assert krippendorff_alpha_nominal([["a", "b"], ["a", "b"]]) == pytest.approx(1.0)
    assert math.isnan(krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]))
    assert math.isnan(krippendorff_alpha_nominal([["a", None], [None, "b"]]))


def test_aspect_agreement_with_and_without_ties():
    """Two raters, the 10-item table above; a third rater on item 0 only, and an item with a
    single rating that must not count."""
    lab = {i: {"r1": R1[i].lower().replace("t", "tie"), "r2": R2[i].lower().replace("t", "tie")}
           for i in range(10)}  # fmt: skip
    lab[0]["r3"] = "a"
    lab[99] = {"r1": "a"}
    with_t = aspect_agreement(lab, "entities", ties=True)
    assert with_t.n_items == 10
    pair = next(p for p in with_t.pairs if (p.rater1, p.rater2) == ("r1", "r2"))
    assert pair.kappa == pytest.approx(0.43 / 0.63)
    assert all(p.rater1 != "r3" and p.rater2 != "r3" for p in with_t.pairs)  # 1 common item < 2
    no_t = aspect_agreement(lab, "entities", ties=False)
    assert no_t.n_items == 7
    assert no_t.pairs[0].kappa == pytest.approx(16 / 23)
    assert no_t.mean_kappa == pytest.approx(16 / 23)
