"""Bootstrap confidence intervals and win/tie/loss rates.

    >>> from alignforge.evaluate.stats import win_tie_loss
    >>> r = win_tie_loss(["win"] * 49 + ["tie"] * 24 + ["loss"] * 27, seed=0)
    >>> round(r.win.value, 2), r.win.low < 0.49 < r.win.high
    (0.49, True)

Intervals come from ``scipy.stats.bootstrap`` with the BCa method (bias-corrected and
accelerated; Efron & Tibshirani 1993, ch. 14), which corrects the plain percentile interval for a
biased or skewed statistic (micro-F1, rates near 0 or 1). The resampled units are the items
(:func:`bootstrap_ci`; a paired difference resamples both systems' columns of an item together)
or whole groups (:func:`bootstrap_by_group`, the by-prompt cluster bootstrap; BCa's jackknife
then leaves out one group at a time). When every resample gives the same value (a constant, a
rate of 0 or 1, one unit) BCa is undefined and the interval is that value, as the percentile
interval says.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np


class Estimate(NamedTuple):
    value: float
    low: float
    high: float

    def fmt(self, pct: bool = False) -> str:
        if pct:
            return f"{100 * self.value:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}]"
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _interval(n: int, statistic, n_boot: int, alpha: float, seed: int):
    """``scipy.stats.bootstrap`` over the indices ``0..n-1`` (so rows of any width, or groups,
    are resampled whole); BCa that every resample makes degenerate falls back to the quantiles."""
    from scipy.stats import DegenerateDataWarning, bootstrap

    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap: alpha must be in (0, 1), got {alpha}")
    if n == 1:  # every resample is the one unit
        value = float(statistic(np.zeros(1, dtype=int)))
        return value, value
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", DegenerateDataWarning)
        res = bootstrap(
            (np.arange(n),),
            lambda i: statistic(i.astype(int)),
            n_resamples=n_boot,
            batch=256,  # bounds memory: the jackknife alone is n x (n - 1) indices
            vectorized=False,
            confidence_level=1 - alpha,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    low, high = res.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):
        low, high = np.quantile(res.bootstrap_distribution, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """BCa bootstrap interval of ``statistic`` over the first axis of ``values``.

    ``values`` may be 2-D (items x columns), e.g. per-item (tp, fp, fn) counts for a micro-F1
    statistic; rows are resampled together.
    """
    x = np.asarray(values, dtype=float)
    if x.shape[0] == 0:
        raise ValueError("bootstrap_ci: no values")
    low, high = _interval(len(x), lambda i: statistic(x[i]), n_boot, alpha, seed)
    return Estimate(float(statistic(x)), low, high)


def bootstrap_by_group(
    values: Sequence[float] | np.ndarray,
    groups: Sequence,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """BCa interval of the mean of ``values`` resampling whole groups (cluster bootstrap).

    Items of one group (e.g. several answer pairs of one prompt) are not independent; resampling
    groups with replacement and taking ``sum(values) / count`` over the drawn groups gives the
    interval a new sample of *groups* would give. With one group the interval has zero width:
    nothing is known about other groups.
    """
    x = np.asarray(values, dtype=float)
    if x.shape[0] == 0 or len(groups) != x.shape[0]:
        raise ValueError(f"bootstrap_by_group: {x.shape[0]} values and {len(groups)} groups")
    _, g = np.unique(np.asarray([str(k) for k in groups]), return_inverse=True)
    sums, counts = np.bincount(g, weights=x), np.bincount(g).astype(float)
    low, high = _interval(len(sums), lambda i: sums[i].sum() / counts[i].sum(), n_boot, alpha, seed)
    return Estimate(float(x.mean()), low, high)


class WinTieLoss(NamedTuple):
    n: int
    win: Estimate
    tie: Estimate
    loss: Estimate
    # win rate counting a tie as half a win, the usual single-number summary
    win_rate: Estimate


def win_tie_loss(
    outcomes: Sequence[str], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> WinTieLoss:
    """Rates of "win" / "tie" / "loss" (from system A's point of view) with bootstrap CIs."""
    allowed = {"win", "tie", "loss"}
    bad = [(i, o) for i, o in enumerate(outcomes) if o not in allowed]
    if bad:
        i, o = bad[0]
        raise ValueError(f"win_tie_loss: outcome {i} is {o!r}; allowed: win, tie, loss")
    codes = np.array([[o == "win", o == "tie", o == "loss"] for o in outcomes], dtype=float)
    if len(codes) == 0:
        raise ValueError("win_tie_loss: no outcomes")
    est = [
        bootstrap_ci(codes, lambda a, j=j: a[:, j].mean(), n_boot, alpha, seed) for j in range(3)
    ]
    wr = bootstrap_ci(codes, lambda a: (a[:, 0] + 0.5 * a[:, 1]).mean(), n_boot, alpha, seed)
    return WinTieLoss(len(codes), est[0], est[1], est[2], wr)


def verdict(low: float, high: float, null: float = 0.0) -> str:
    """How the interval of a difference (higher = better) reads: "improved" when it lies wholly
    above ``null``, "worse" when wholly below, "no clear difference" when it contains ``null``.

    >>> verdict(0.02, 0.2), verdict(-0.05, 0.1), verdict(-0.3, -0.01)
    ('improved', 'no clear difference', 'worse')
    """
    return "improved" if low > null else "worse" if high < null else "no clear difference"


def improvement_header(verdicts: Sequence[str]) -> str:
    """A summary's header: it claims improvement only when some difference is significant."""
    return "What improved" if "improved" in verdicts else "No clear improvement"
