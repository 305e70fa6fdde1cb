"""Bootstrap confidence intervals and win/tie/loss rates.

    >>> from alignforge.evaluate.stats import win_tie_loss
    >>> r = win_tie_loss(["win"] * 49 + ["tie"] * 24 + ["loss"] * 27, seed=0)
    >>> round(r.win.value, 2), r.win.low < 0.49 < r.win.high
    (0.49, True)

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the items with replacement,
recompute the statistic, take the alpha/2 and 1-alpha/2 quantiles.
"""

from __future__ import annotations

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


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap interval of ``statistic`` over the first axis of ``values``.

    ``values`` may be 2-D (items x columns), e.g. per-item (tp, fp, fn) counts for a micro-F1
    statistic; rows are resampled together.
    """
    x = np.asarray(values, dtype=float)
    if x.shape[0] == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    point = float(statistic(x))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    stats = np.array([statistic(x[i]) for i in idx], dtype=float)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Estimate(point, float(low), float(high))


def bootstrap_by_group(
    values: Sequence[float] | np.ndarray,
    groups: Sequence,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """Percentile interval of the mean of ``values`` resampling whole groups (cluster bootstrap).

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
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(n_boot, len(sums)))
    stats = sums[idx].sum(1) / counts[idx].sum(1)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(x.mean()), float(low), float(high))


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
