"""Inter-annotator agreement: Cohen's kappa (pairs of raters) and Krippendorff's alpha (nominal).

    from alignforge.annotate.agreement import cohen_kappa, krippendorff_alpha_nominal
    cohen_kappa(["a", "b", "tie"], ["a", "b", "b"])                # 0.5
    krippendorff_alpha_nominal([["a", "a", None], ["a", "b", "b"]])  # raters x units

Agreement bounds what a reward model can learn: it cannot pick the preferred completion more
often than the annotators agree with each other. ``aspect_agreement`` reports both metrics per
aspect *with* ties and *without* ties; "without" drops every item on which any rater answered
tie, i.e. it measures agreement on the direction of clear preferences only.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import NamedTuple


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


def krippendorff_alpha_nominal(matrix: Sequence[Sequence[Hashable | None]]) -> float:
    """Krippendorff's alpha for nominal data; ``matrix`` is raters x units, None = missing.

    Build the coincidence matrix o_ck = sum_u (number of ordered pairs (c, k) of values in unit u)
    / (m_u - 1) over units with m_u >= 2 values; n_c = sum_k o_ck, n = sum_c n_c. Then
    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k.
    Returns nan with fewer than two pairable values or when only one label was ever used.
    """
    units = list(zip(*matrix, strict=True)) if matrix else []
    o: dict[tuple, float] = defaultdict(float)
    for unit in units:
        vals = [v for v in unit if v is not None]
        m = len(vals)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            o[(vals[i], vals[j])] += 1.0 / (m - 1)
    n_c: dict[Hashable, float] = defaultdict(float)
    for (c, _), w in o.items():
        n_c[c] += w
    n = sum(n_c.values())
    if n < 2:
        return math.nan
    disagree = sum(w for (c, k), w in o.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if expected == 0:
        return math.nan
    return 1.0 - (n - 1) * disagree / expected


class PairKappa(NamedTuple):
    rater1: str
    rater2: str
    n_items: int
    kappa: float


class AspectAgreement(NamedTuple):
    aspect: str
    ties: bool  # False: items where any rater said tie were dropped
    n_items: int  # items with at least two raters (after the tie filter)
    alpha: float
    mean_kappa: float  # mean of the pairwise kappas that are defined
    pairs: list[PairKappa]


def label(score: float) -> str:
    """Nominal category of a canonical score: 'a' (a better), 'tie', 'b' (b better)."""
    return "a" if score > 0 else "b" if score < 0 else "tie"


def aspect_agreement(
    labels: dict[int, dict[str, Hashable]], aspect: str, ties: bool = True, min_pair_items: int = 2
) -> AspectAgreement:
    """Agreement on one aspect; ``labels[item_id][rater] = category`` (tie category = 'tie').

    Only items labelled by at least two raters count. With ``ties=False`` every item where any
    rater answered 'tie' (or 0 on the 5-point scale) is dropped first.
    """
    items = {i: r for i, r in labels.items() if len(r) >= 2}
    if not ties:
        items = {i: r for i, r in items.items() if not any(_is_tie(v) for v in r.values())}
    raters = sorted({r for rs in items.values() for r in rs})
    ids = sorted(items)
    matrix = [[items[i].get(r) for i in ids] for r in raters]
    alpha = krippendorff_alpha_nominal(matrix) if ids else math.nan
    pairs = []
    for r1, r2 in itertools.combinations(raters, 2):
        common = [i for i in ids if r1 in items[i] and r2 in items[i]]
        if len(common) < min_pair_items:
            continue
        k = cohen_kappa([items[i][r1] for i in common], [items[i][r2] for i in common])
        pairs.append(PairKappa(r1, r2, len(common), k))
    defined = [p.kappa for p in pairs if not math.isnan(p.kappa)]
    mean_k = sum(defined) / len(defined) if defined else math.nan
    return AspectAgreement(aspect, ties, len(ids), alpha, mean_k, pairs)


def _is_tie(v: Hashable) -> bool:
    return v == "tie" or v == 0 or v == "0"
