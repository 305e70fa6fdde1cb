"""Inter-annotator agreement: Cohen's and Fleiss' kappa, Krippendorff's alpha with bootstrap CIs.

    from alignforge.annotate.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha
    cohen_kappa(["a", "b", "tie"], ["a", "b", "b"])                      # 0.5
    krippendorff_alpha([[2, 1, None], [1, 1, -1]], level="ordinal")      # raters x units
    fleiss_kappa([[3, 0, 0], [1, 2, 0]])                                 # units x categories

Agreement bounds what a reward model can learn: it cannot pick the preferred completion more
often than the annotators agree with each other. ``aspect_agreement`` reports, per aspect, alpha
at the scale's level of measurement (ordinal for the 5-point scale, where "A much better" vs "A
better" is a near miss, not a disagreement), a 95% bootstrap interval over items, Fleiss' kappa
and the mean pairwise Cohen's kappa on the direction (A / tie / B).

"Without ties" is decided per rater pair: a pair of ratings counts unless one of the two is a
tie. For alpha this means tie ratings are treated as missing values (alpha is built from pairs
of values within a unit); for the pairwise kappas each pair of raters keeps the items on which
neither said tie. Dropping every item on which *any* rater said tie would leave almost nothing
with many raters.

Alpha here is computed from per-unit coincidence matrices with numpy, so that one resampling of
the units serves every aspect; tests check it against the ``krippendorff`` package.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

LEVELS = ("nominal", "ordinal", "interval")


def cohen_kappa(r1: Sequence[Hashable], r2: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters over the same items.

    kappa = (p_o - p_e) / (1 - p_e), with p_o the share of items both raters labelled alike and
    p_e = sum_c p1(c) p2(c) the agreement expected from their marginal label rates. Returns
    nan when p_e = 1 (both raters used one and the same label throughout: kappa is undefined).
    """
    if len(r1) != len(r2):
        raise ValueError(f"cohen_kappa: {len(r1)} vs {len(r2)} labels")
    n = len(r1)
    if n == 0:
        return math.nan
    p_o = sum(a == b for a, b in zip(r1, r2, strict=True)) / n
    c1, c2 = Counter(r1), Counter(r2)
    p_e = sum(c1[c] * c2[c] for c in c1) / (n * n)
    if p_e >= 1.0:
        return math.nan
    return (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Fleiss' kappa; ``counts[u][c]`` = raters who put unit u in category c (units x categories).

    P_u = sum_c n_uc (n_uc - 1) / (m_u (m_u - 1)) is the agreement within unit u (m_u raters),
    P = mean_u P_u, p_c = sum_u n_uc / sum_u m_u, P_e = sum_c p_c^2 and
    kappa = (P - P_e) / (1 - P_e). Units with fewer than two ratings are left out; m_u may vary
    between units (the usual generalisation; with a constant m it is Fleiss 1971 exactly).
    Returns nan with no usable unit or when one category holds every rating.
    """
    n = np.asarray(counts, dtype=float).reshape(len(counts), -1)
    m = n.sum(1)
    n, m = n[m >= 2], m[m >= 2]
    if len(m) == 0:
        return math.nan
    p_u = (n * (n - 1)).sum(1) / (m * (m - 1))
    p_c = n.sum(0) / m.sum()
    p_e = float((p_c**2).sum())
    if p_e >= 1.0:
        return math.nan
    return float((p_u.mean() - p_e) / (1 - p_e))


def unit_coincidences(counts: np.ndarray) -> np.ndarray:
    """Per-unit coincidence matrices (U, C, C) from value counts ``counts[u, c]`` (U, C).

    For a unit with m_u = sum_c n_uc >= 2 values, O_u[c, k] = (n_uc n_uk - [c == k] n_uc) /
    (m_u - 1): its ordered pairs of values, weighted so that each unit contributes m_u pairable
    values. Units with fewer values give zeros.
    """
    m = counts.sum(1)
    o = counts[:, :, None] * counts[:, None, :]
    diag = np.arange(counts.shape[1])
    o[:, diag, diag] -= counts
    scale = np.where(m >= 2, 1.0 / np.maximum(m - 1, 1), 0.0)
    return o * scale[:, None, None]


def _delta(values: np.ndarray, level: str, n_c: np.ndarray) -> np.ndarray:
    """Squared distances delta^2_ck, shape (..., C, C) (n_c: (..., C) marginal frequencies)."""
    c = len(values)
    if level == "nominal":
        return np.broadcast_to(1.0 - np.eye(c), (*n_c.shape[:-1], c, c))
    if level == "interval":
        d = (values[:, None] - values[None, :]) ** 2
        return np.broadcast_to(d, (*n_c.shape[:-1], c, c))
    if level != "ordinal":
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    # ordinal: (sum_{g between c and k} n_g - (n_c + n_k) / 2)^2, values in ascending order
    cum = np.cumsum(n_c, axis=-1)
    lo, hi = (
        np.minimum.outer(np.arange(c), np.arange(c)),
        np.maximum.outer(np.arange(c), np.arange(c)),
    )
    between = cum[..., hi] - cum[..., lo] + n_c[..., lo]
    return (between - (n_c[..., :, None] + n_c[..., None, :]) / 2) ** 2


def alpha_from_coincidences(o: np.ndarray, values: Sequence[float], level: str) -> np.ndarray:
    """alpha = 1 - (n - 1) sum o_ck d_ck / sum n_c n_k d_ck for coincidences ``o`` (..., C, C).

    nan where fewer than two pairable values exist or the values never differ (D_e = 0).
    """
    n_c = o.sum(-1)
    n = n_c.sum(-1)
    d = _delta(np.asarray(values, dtype=float), level, n_c)
    observed = (o * d).sum((-2, -1))
    expected = (n_c[..., :, None] * n_c[..., None, :] * d).sum((-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1.0 - (n - 1) * observed / expected
    return np.where((expected > 0) & (n >= 2), alpha, np.nan)


def krippendorff_alpha(
    matrix: Sequence[Sequence[Hashable | None]], level: str = "nominal"
) -> float:
    """Krippendorff's alpha; ``matrix`` is raters x units with None for a missing rating.

    Ordinal and interval data need numbers (ordinal uses only their order). With ``o_ck`` the
    coincidences summed over units (``unit_coincidences``), n_c = sum_k o_ck and n = sum_c n_c:
    alpha = 1 - (n - 1) sum_{c,k} o_ck delta_ck / sum_{c,k} n_c n_k delta_ck, where delta is
    [c != k] (nominal), (c - k)^2 (interval) or (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2
    (ordinal). Returns nan with fewer than two pairable values or a single value used.
    """
    values = sorted({v for row in matrix for v in row if v is not None}, key=_order)
    if not values:
        return math.nan
    index = {v: k for k, v in enumerate(values)}
    counts = np.zeros((len(matrix[0]), len(values)))
    for row in matrix:
        for u, v in enumerate(row):
            if v is not None:
                counts[u, index[v]] += 1
    o = unit_coincidences(counts).sum(0)
    vals = values if level != "nominal" else list(range(len(values)))
    return float(alpha_from_coincidences(o, vals, level))


def _order(v: Hashable):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def bootstrap_weights(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_units) counts of each unit in a resample of the units with replacement."""
    rng = np.random.default_rng(seed)
    if n_units == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(float)


def alpha_interval(
    o_units: np.ndarray, values: Sequence[float], level: str, weights: np.ndarray
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of alpha, resampling units by ``weights`` (B, U)."""
    if o_units.shape[0] == 0 or weights.shape[0] == 0:
        return math.nan, math.nan
    c = o_units.shape[-1]
    o = (weights @ o_units.reshape(len(o_units), c * c)).reshape(-1, c, c)
    a = alpha_from_coincidences(o, values, level)
    a = a[~np.isnan(a)]
    if len(a) < 0.9 * len(weights):
        return math.nan, math.nan
    lo, hi = np.percentile(a, [2.5, 97.5])
    return float(lo), float(hi)


class PairKappa(NamedTuple):
    rater1: str
    rater2: str
    n_items: int
    kappa: float


class AspectAgreement(NamedTuple):
    aspect: str
    ties: bool  # False: tie ratings left out, pair by pair (see the module docstring)
    level: str  # level of measurement of alpha
    n_items: int  # items with at least two (non-tie when ties=False) ratings
    alpha: float
    alpha_lo: float  # 95% bootstrap interval (nan without resampling or too few items)
    alpha_hi: float
    fleiss: float  # Fleiss' kappa on the direction (A / tie / B)
    mean_kappa: float  # mean of the pairwise Cohen's kappas (direction) that are defined
    pairs: list[PairKappa]


def label(score: float) -> str:
    """Nominal category of a canonical score: 'a' (a better), 'tie', 'b' (b better)."""
    return "a" if score > 0 else "b" if score < 0 else "tie"


class Ratings(NamedTuple):
    """One aspect's ratings as arrays, built once and sliced per window."""

    unit: np.ndarray  # (N,) item id of each rating
    rater: np.ndarray  # (N,) index into ``raters``
    value: np.ndarray  # (N,) canonical score, 0 = tie
    raters: list[str]


def to_ratings(scores: dict[int, dict[str, int]]) -> Ratings:
    """``scores[item_id][rater]`` -> ``Ratings``."""
    raters = sorted({r for rs in scores.values() for r in rs})
    index = {r: k for k, r in enumerate(raters)}
    flat = [(i, index[r], v) for i, rs in scores.items() for r, v in rs.items()]
    arr = np.array(flat, dtype=float).reshape(-1, 3)
    return Ratings(arr[:, 0].astype(np.int64), arr[:, 1].astype(int), arr[:, 2], raters)


def aspect_agreement(
    scores: dict[int, dict[str, int]] | Ratings,
    aspect: str,
    ties: bool = True,
    level: str = "nominal",
    weights: np.ndarray | None = None,
    item_order: Sequence[int] | None = None,
    min_pair_items: int = 2,
) -> AspectAgreement:
    """Agreement on one aspect; ``scores[item_id][rater]`` = canonical score (0 = tie).

    Only the items in ``item_order`` (default: all) count. ``weights`` (B, len(item_order))
    resamples those items for the interval, so that every aspect of one window shares the same
    resamples; None skips the interval.
    """
    rt = scores if isinstance(scores, Ratings) else to_ratings(scores)
    order = np.array(sorted(item_order if item_order is not None else set(rt.unit.tolist())),
                     dtype=np.int64)  # fmt: skip
    pos = np.minimum(np.searchsorted(order, rt.unit), max(len(order) - 1, 0))
    keep = (order[pos] == rt.unit) if len(order) else np.zeros(len(rt.unit), bool)
    if not ties:
        keep &= rt.value != 0
    u_idx, v_all = pos[keep], rt.value[keep]
    present, r_idx = np.unique(rt.rater[keep], return_inverse=True)
    raters = [rt.raters[k] for k in present]
    values = sorted(set(v_all.tolist()))
    counts = np.zeros((len(order), len(values)))
    np.add.at(counts, (u_idx, np.searchsorted(values, v_all)), 1)
    n_items = int((counts.sum(1) >= 2).sum())
    alpha, lo, hi = math.nan, math.nan, math.nan
    if n_items:
        o_units = unit_coincidences(counts)
        vals = values if level != "nominal" else list(range(len(values)))
        alpha = float(alpha_from_coincidences(o_units.sum(0), vals, level))
        if weights is not None:
            lo, hi = alpha_interval(o_units, vals, level, weights)
    # direction categories: a / tie / b, or a / b without ties
    d_idx = np.where(v_all > 0, 0, np.where(v_all < 0, 1 if not ties else 2, 1))
    onehot = np.zeros((len(raters), len(order), 3 if ties else 2))
    onehot[r_idx, u_idx, d_idx] = 1.0
    fleiss = fleiss_kappa(onehot.sum(0)) if len(order) else math.nan
    pairs = pairwise_kappas(onehot, raters, min_pair_items)
    defined = [p.kappa for p in pairs if not math.isnan(p.kappa)]
    mean_k = sum(defined) / len(defined) if defined else math.nan
    return AspectAgreement(aspect, ties, level, n_items, alpha, lo, hi, fleiss, mean_k, pairs)


def pairwise_kappas(onehot: np.ndarray, raters: list[str], min_items: int) -> list[PairKappa]:
    """Cohen's kappa of every pair of raters over the items both rated; ``onehot`` (R, I, C).

    A rating left out (missing, or a tie without ties) has no category, so each pair keeps
    exactly the items on which both raters gave a category.
    """
    r, n_items, c = onehot.shape
    if r < 2:
        return []
    flat = onehot.transpose(0, 2, 1).reshape(r * c, n_items)
    tables = (flat @ flat.T).reshape(r, c, r, c)  # [a, x, b, y]: items a said x and b said y
    n = tables.sum((1, 3))
    agree = np.einsum("axbx->ab", tables)
    p_e = (tables.sum(3).transpose(0, 2, 1) * tables.sum(1)).sum(-1)  # sum_x n_a(x) n_b(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_o, p_e = agree / n, p_e / (n * n)
        kappa = np.where(p_e < 1.0, (p_o - p_e) / (1 - p_e), np.nan)
    a_idx, b_idx = np.triu_indices(r, 1)
    keep = n[a_idx, b_idx] >= max(min_items, 1)
    return [
        PairKappa(raters[a], raters[b], int(n[a, b]), float(kappa[a, b]))
        for a, b in zip(a_idx[keep], b_idx[keep], strict=True)
    ]


# ------------------------------------------------------------------ the reward model's ceiling
def decisive_agreement(directions: dict[int, dict[str, int]]) -> tuple[float, int]:
    """(share of agreeing pairs, number of pairs) over every pair of raters of one item whose
    directions (``{item: {rater: -1 | 0 | 1}}``) are both decisive; (nan, 0) without pairs."""
    agree = pairs = 0
    for raters in directions.values():
        votes = [v for v in raters.values() if v != 0]
        for i, x in enumerate(votes):
            for y in votes[i + 1 :]:
                pairs += 1
                agree += x == y
    return (agree / pairs if pairs else math.nan), pairs


def rater_accuracy(agreement: float) -> float:
    """Each rater's chance of giving the true direction, from two raters' agreement.

    Two independent raters that are each right with probability q agree with probability
    A = q² + (1 − q)², so q = (1 + √(2A − 1)) / 2. A ≤ 1/2 (no better than chance) gives 1/2.
    """
    if math.isnan(agreement):
        return math.nan
    return (1.0 + math.sqrt(max(0.0, 2.0 * agreement - 1.0))) / 2.0


def majority_accuracy(q: float, n: int) -> float:
    """Chance that the majority of ``n`` independent raters, each right with probability ``q``,
    gives the true direction, given that it is not split evenly:

        Σ_{k > n/2} C(n, k) qᵏ (1 − q)ⁿ⁻ᵏ  /  Σ_{k ≠ n/2} C(n, k) qᵏ (1 − q)ⁿ⁻ᵏ

    This is the expected accuracy of a perfect model (one that always knows the true direction)
    against a label made from ``n`` such votes: the ceiling of a reward model on that label.
    """
    if n < 1 or math.isnan(q):
        return math.nan
    p = [math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)]
    right = sum(p[k] for k in range(n + 1) if 2 * k > n)
    decided = sum(p[k] for k in range(n + 1) if 2 * k != n)
    return right / decided
