"""Reward-drift monitor: notice when the reward model starts scoring the policy's samples unlike
anything it saw at evaluation time.

During PPO the policy can drift to outputs the reward model never saw; the RM then hands out
scores that would have been outliers on its evaluation set, and the run soon collapses (numerical
blow-up or nonsense text). The monitor compares a rolling window of recent scores with the RM's
scores on its own evaluation data, using three signals:

* **outlier share**: fraction of window scores below the reference's ``low_q`` quantile or above
  its ``high_q`` quantile. Without drift it is about ``low_q + (1 - high_q)`` (0.02 by default).
* **PSI** (population stability index; Siddiqi 2006, Yurdakul 2018): with bins cut at the
  reference's quantiles (``n_bins`` equal-mass bins), ``e_i`` the reference share and ``a_i``
  the window share of bin ``i``, ``PSI = sum_i (a_i - e_i) ln(a_i / e_i)`` (shares floored at
  ``1e-4`` so an empty bin stays finite). Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift,
  > 0.25 major shift.
* **KS**: the two-sample Kolmogorov-Smirnov statistic ``D = sup_x |F_ref(x) - F_win(x)|`` and its
  asymptotic p-value ``Q_KS(sqrt(n m / (n + m)) D)``.

    >>> import numpy as np
    >>> from alignforge.rl.drift import RewardDriftMonitor, DriftAction, decide
    >>> rng = np.random.default_rng(0)
    >>> monitor = RewardDriftMonitor(rng.normal(0, 1, 2000), window=256)
    >>> monitor.update(rng.normal(0, 1, 256)).breached
    False
    >>> report = monitor.update(rng.normal(3, 1, 256))          # the RM now sees outliers
    >>> report.breached, report.reasons[0].split(" ")[0]
    (True, 'outlier_frac')
    >>> decide(report, "restore")
    <DriftAction.RESTORE: 'restore'>

What to do on a breach (warn, restore the last checkpoint with a lower learning rate, stop) is
the PPO recipe's decision; :func:`decide` maps a report and the configured action to it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np

_PSI_FLOOR = 1e-4


class DriftAction(StrEnum):
    """What the training loop does when drift is detected."""

    WARN = "warn"
    RESTORE = "restore"
    STOP = "stop"


class DriftReport(NamedTuple):
    breached: bool
    outlier_frac: float
    psi: float
    ks_stat: float
    ks_pvalue: float
    mean: float  # mean of the window
    reference_mean: float
    reasons: tuple[str, ...]  # one line per breached threshold
    n_samples: int  # scores in the window


def _as_array(scores: Any, name: str) -> np.ndarray:
    if hasattr(scores, "detach"):  # torch tensor, without importing torch here
        scores = scores.detach().float().cpu().numpy()
    arr = np.asarray(scores, dtype=np.float64).ravel()
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} holds non-finite values at positions {bad[:10].tolist()}")
    return arr


def psi_bin_edges(reference: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges at the reference's ``1/n_bins .. (n_bins-1)/n_bins`` quantiles (deduped)."""
    qs = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.unique(np.quantile(reference, qs))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin ``(-inf, e_1), [e_1, e_2), ..., [e_k, inf)``."""
    idx = np.searchsorted(edges, values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1) / max(len(values), 1)


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """``PSI = sum_i (a_i - e_i) ln(a_i / e_i)`` over bin shares (floored at 1e-4)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), _PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), _PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def kolmogorov_sf(x: float) -> float:
    """Survival function of the Kolmogorov distribution, ``P(K > x)``."""
    if x <= 0:
        return 1.0
    if x < 1.0:  # the theta-function form converges fast for small x
        cdf = math.sqrt(2 * math.pi) / x
        cdf *= sum(math.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * x * x)) for k in range(1, 50))
        return min(max(1.0 - cdf, 0.0), 1.0)
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))
    return min(max(2.0 * total, 0.0), 1.0)


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic ``D = sup |F_a - F_b|`` and its asymptotic p-value."""
    a, b = np.sort(a), np.sort(b)
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / len(a)
    cdf_b = np.searchsorted(b, points, side="right") / len(b)
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    en = len(a) * len(b) / (len(a) + len(b))
    return d, kolmogorov_sf(math.sqrt(en) * d)


class RewardDriftMonitor:
    """Rolling comparison of reward scores against the reward model's evaluation scores.

    ``reference_scores``: the RM's scores on its evaluation set (1-D, >= 10 values).
    ``window``: how many recent scores form the compared sample. A breach needs at least
    ``min_samples`` scores in the window and one of: outlier share > ``max_outlier_frac``,
    PSI > ``psi_threshold``, or (if set) KS statistic > ``ks_threshold``.
    """

    def __init__(
        self,
        reference_scores: Iterable[float] | Any,
        window: int = 256,
        low_q: float = 0.01,
        high_q: float = 0.99,
        max_outlier_frac: float = 0.1,
        psi_threshold: float = 0.25,
        ks_threshold: float | None = None,
        min_samples: int = 32,
        n_bins: int = 10,
    ) -> None:
        reference = _as_array(reference_scores, "reference_scores")
        if reference.size < 10:
            raise ValueError(f"reference_scores has {reference.size} values; need at least 10")
        if not 0.0 <= low_q < high_q <= 1.0:
            raise ValueError(f"need 0 <= low_q < high_q <= 1; got low_q={low_q}, high_q={high_q}")
        if window < 1 or min_samples < 1 or n_bins < 2:
            raise ValueError(
                f"window={window}, min_samples={min_samples} >= 1, n_bins={n_bins} >= 2"
            )
        self.reference = np.sort(reference)
        self.low, self.high = np.quantile(self.reference, [low_q, high_q])
        self.edges = psi_bin_edges(self.reference, n_bins)
        self.reference_shares = bin_shares(self.reference, self.edges)
        self.max_outlier_frac = max_outlier_frac
        self.psi_threshold = psi_threshold
        self.ks_threshold = ks_threshold
        self.min_samples = min_samples
        self.scores: deque[float] = deque(maxlen=window)
        self.n_seen = 0

    def update(self, scores: Iterable[float] | Any) -> DriftReport:
        """Add a batch of scores ``(B,)`` to the window and compare the window to the reference."""
        new = _as_array(scores, "scores")
        self.scores.extend(new.tolist())
        self.n_seen += new.size
        return self.report()

    def report(self) -> DriftReport:
        """Statistics of the current window (NaN statistics while the window is empty)."""
        sample = np.asarray(self.scores, dtype=np.float64)
        ref_mean = float(self.reference.mean())
        if sample.size == 0:
            nan = float("nan")
            return DriftReport(False, nan, nan, nan, nan, nan, ref_mean, (), 0)
        outlier_frac = float(np.mean((sample < self.low) | (sample > self.high)))
        psi = population_stability_index(self.reference_shares, bin_shares(sample, self.edges))
        ks_stat, ks_p = ks_two_sample(self.reference, sample)
        reasons: list[str] = []
        if sample.size >= self.min_samples:
            if outlier_frac > self.max_outlier_frac:
                reasons.append(
                    f"outlier_frac {outlier_frac:.3f} > max_outlier_frac {self.max_outlier_frac} "
                    f"(scores outside [{self.low:.3g}, {self.high:.3g}])"
                )
            if psi > self.psi_threshold:
                reasons.append(f"psi {psi:.3f} > psi_threshold {self.psi_threshold}")
            if self.ks_threshold is not None and ks_stat > self.ks_threshold:
                reasons.append(f"ks_stat {ks_stat:.3f} > ks_threshold {self.ks_threshold}")
        return DriftReport(
            breached=bool(reasons),
            outlier_frac=outlier_frac,
            psi=psi,
            ks_stat=ks_stat,
            ks_pvalue=ks_p,
            mean=float(sample.mean()),
            reference_mean=ref_mean,
            reasons=tuple(reasons),
            n_samples=int(sample.size),
        )

    def state_dict(self) -> dict[str, Any]:
        """The window and the reference; thresholds come from the constructor (the config)."""
        return {
            "scores": list(self.scores),
            "n_seen": self.n_seen,
            "window": self.scores.maxlen,
            "reference": self.reference.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the window; refuses a state saved against a different reference or window."""
        reference = np.asarray(state["reference"], dtype=np.float64)
        if reference.shape != self.reference.shape or not np.array_equal(reference, self.reference):
            raise ValueError("state['reference'] differs from this monitor's reference_scores")
        if state["window"] != self.scores.maxlen:
            raise ValueError(f"state['window']={state['window']} but window={self.scores.maxlen}")
        self.scores = deque((float(s) for s in state["scores"]), maxlen=self.scores.maxlen)
        self.n_seen = int(state["n_seen"])


def decide(report: DriftReport, action: DriftAction | str) -> DriftAction | None:
    """The configured action if the report is a breach, else None."""
    try:
        chosen = DriftAction(action)
    except ValueError:
        allowed = ", ".join(a.value for a in DriftAction)
        raise ValueError(f"drift action {action!r} is not one of {allowed}") from None
    return chosen if report.breached else None


MIN_DRIFT_REFERENCE = 10  # a distribution cannot be compared with fewer reference scores


def monitor_from_reference(
    reference: str | None, reward_model: str | None, **settings
) -> RewardDriftMonitor | None:
    """The monitor against ``reference`` (a JSON list of scores), by default the
    ``reward_scores_eval.json`` the reward-model stage writes beside its model; None without one.

    ``settings`` are :class:`RewardDriftMonitor`'s (window, max_outlier_frac, psi_threshold,
    min_samples).
    """
    import json
    import warnings
    from pathlib import Path

    from alignforge.config import ConfigError

    ref = reference or (
        str(Path(reward_model) / "reward_scores_eval.json") if reward_model else None
    )
    if ref is None:
        return None
    if not Path(ref).exists():
        raise ConfigError(
            f"drift_reference: {ref} does not exist (the RM stage writes reward_scores_eval.json next to its model)"
        )
    scores = json.loads(Path(ref).read_text())
    if len(scores) < MIN_DRIFT_REFERENCE:
        warnings.warn(
            f"drift monitor off: {ref} holds {len(scores)} reward scores, fewer than "
            f"{MIN_DRIFT_REFERENCE}; a distribution cannot be compared with so few (give the RM more eval pairs)",
            stacklevel=2,
        )
        return None
    return RewardDriftMonitor(scores, **settings)
