import math

import numpy as np
import pytest
import torch
from scipy import stats

from alignforge.rl.drift import (
    DriftAction,
    RewardDriftMonitor,
    bin_shares,
    decide,
    ks_two_sample,
    population_stability_index,
    psi_bin_edges,
)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def test_psi_hand_value():
    # reference (0, 1, 2, 3), two bins split at the median 1.5: shares (0.5, 0.5)
    edges = psi_bin_edges(np.array([0.0, 1.0, 2.0, 3.0]), n_bins=2)
    assert edges.tolist() == [1.5]
    actual = bin_shares(np.array([0.0, 0.0, 0.0, 3.0]), edges)
    assert actual.tolist() == [0.75, 0.25]
    # (0.75 - 0.5) ln(1.5) + (0.25 - 0.5) ln(0.5)
    expected = 0.25 * math.log(1.5) - 0.25 * math.log(0.5)
    assert population_stability_index([0.5, 0.5], actual) == pytest.approx(expected)
    assert population_stability_index([0.5, 0.5], [0.5, 0.5]) == 0.0


def test_psi_through_the_monitor():
    monitor = RewardDriftMonitor(np.arange(10.0), n_bins=2, max_outlier_frac=1.0, min_samples=32)
    report = monitor.update([0.0] * 24 + [9.0] * 8)
    assert report.psi == pytest.approx(0.25 * math.log(1.5) - 0.25 * math.log(0.5))
    assert report.breached and report.reasons == (f"psi {report.psi:.3f} > psi_threshold 0.25",)


def test_ks_matches_scipy(rng):
    a, b = rng.normal(0, 1, 500), rng.normal(0.3, 1.2, 120)
    d, p = ks_two_sample(a, b)
    assert d == pytest.approx(stats.ks_2samp(a, b).statistic)
    en = len(a) * len(b) / (len(a) + len(b))
    assert p == pytest.approx(stats.kstwobign.sf(math.sqrt(en) * d), rel=1e-9)


def test_no_breach_on_same_distribution(rng):
    monitor = RewardDriftMonitor(rng.normal(0, 1, 2000), window=256)
    for _ in range(8):
        report = monitor.update(rng.normal(0, 1, 64))
        assert not report.breached, report.reasons
    assert report.n_samples == 256
    assert report.outlier_frac < 0.06 and report.psi < 0.1 and report.ks_pvalue > 0.01


def test_breach_on_shifted_scores(rng):
    monitor = RewardDriftMonitor(rng.normal(0, 1, 2000), window=128, ks_threshold=0.3)
    monitor.update(rng.normal(0, 1, 128))
    report = monitor.update(torch.tensor(rng.normal(2.5, 1, 128)))  # tensors accepted
    assert report.breached
    assert [r.split(" ")[0] for r in report.reasons] == ["outlier_frac", "psi", "ks_stat"]
    assert report.mean > report.reference_mean + 2


def test_rolling_window_recovers(rng):
    monitor = RewardDriftMonitor(rng.normal(0, 1, 2000), window=100)
    assert monitor.update(rng.normal(4, 1, 100)).breached
    assert not monitor.update(rng.normal(0, 1, 100)).breached  # shifted scores rolled out


def test_no_breach_before_min_samples(rng):
    monitor = RewardDriftMonitor(rng.normal(0, 1, 2000), min_samples=32)
    report = monitor.update(rng.normal(5, 1, 31))
    assert not report.breached and report.outlier_frac > 0.9
    assert monitor.update(rng.normal(5, 1, 1)).breached


def test_state_dict_resume_is_exact(rng):
    ref = rng.normal(0, 1, 500)
    a = RewardDriftMonitor(ref, window=64)
    a.update(rng.normal(0.5, 1, 100))
    b = RewardDriftMonitor(ref, window=64)
    b.load_state_dict(a.state_dict())
    nxt = rng.normal(1.0, 1, 10)
    assert a.update(nxt) == b.update(nxt)
    with pytest.raises(ValueError, match="reference"):
        RewardDriftMonitor(ref + 1, window=64).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="window"):
        RewardDriftMonitor(ref, window=32).load_state_dict(a.state_dict())


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match="at least 10"):
        RewardDriftMonitor([1.0, 2.0])
    with pytest.raises(ValueError, match="low_q"):
        RewardDriftMonitor(rng.normal(size=50), low_q=0.9, high_q=0.1)
    monitor = RewardDriftMonitor(rng.normal(size=50))
    with pytest.raises(ValueError, match=r"scores holds non-finite values at positions \[1\]"):
        monitor.update([0.0, float("nan")])


def test_decide(rng):
    monitor = RewardDriftMonitor(rng.normal(0, 1, 500))
    quiet = monitor.update(rng.normal(0, 1, 64))
    assert decide(quiet, "stop") is None
    loud = monitor.update(rng.normal(6, 1, 256))
    assert decide(loud, "restore") is DriftAction.RESTORE
    assert decide(loud, DriftAction.WARN) is DriftAction.WARN
    with pytest.raises(ValueError, match="warn, restore, stop"):
        decide(loud, "panic")


def test_outlier_share_matches_the_quantiles_without_drift(rng):
    monitor = RewardDriftMonitor(
        rng.normal(0, 1, 20_000), window=20_000, low_q=0.05, high_q=0.9, max_outlier_frac=0.2
    )
    report = monitor.update(rng.normal(0, 1, 20_000))
    assert report.outlier_frac == pytest.approx(0.05 + 0.1, abs=0.01)
    assert not report.breached
