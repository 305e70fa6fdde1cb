import numpy as np
import pytest

from alignforge.evaluate.stats import bootstrap_ci, win_tie_loss


def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.normal(1.0, 1.0, 50), seed=0)
    large = bootstrap_ci(rng.normal(1.0, 1.0, 5000), seed=0, n_boot=500)
    assert small.low < small.value < small.high
    assert large.low < 1.0 < large.high
    assert (large.high - large.low) < (small.high - small.low)


def test_bootstrap_ci_of_constant_is_degenerate():
    est = bootstrap_ci([2.0] * 10)
    assert est == (2.0, 2.0, 2.0)


def test_bootstrap_coverage_is_near_nominal():
    # 95% intervals of the mean of N(0,1) samples should cover 0 in roughly 95% of trials.
    rng = np.random.default_rng(7)
    covered = 0
    for t in range(150):
        est = bootstrap_ci(rng.normal(0, 1, 40), n_boot=300, seed=t)
        covered += est.low <= 0 <= est.high
    assert 0.85 <= covered / 150 <= 0.99


def test_win_tie_loss_rates_match_counts():
    r = win_tie_loss(["win"] * 49 + ["tie"] * 24 + ["loss"] * 27, seed=0)
    assert r.n == 100
    assert r.win.value == pytest.approx(0.49)
    assert r.tie.value == pytest.approx(0.24)
    assert r.loss.value == pytest.approx(0.27)
    assert r.win_rate.value == pytest.approx(0.49 + 0.12)
    assert r.win.low < 0.49 < r.win.high


def test_win_tie_loss_rejects_unknown_outcome():
    with pytest.raises(ValueError, match="outcome 1 is 'draw'"):
        win_tie_loss(["win", "draw"])


def test_bootstrap_ci_is_scipys_bca_interval_and_one_item_has_zero_width():
    """Resampling item indices gives exactly scipy's BCa interval of the mean on the data."""
    from scipy.stats import bootstrap

    x = np.random.default_rng(3).exponential(size=60)  # skewed: BCa moves the interval right
    est = bootstrap_ci(x, n_boot=999, seed=5)
    ref = bootstrap(
        (x,), np.mean, n_resamples=999, batch=256, method="BCa", rng=np.random.default_rng(5)
    ).confidence_interval
    assert (est.low, est.high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert est.high - est.value > est.value - est.low
    assert bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)


def test_a_difference_reads_by_whether_its_interval_excludes_the_null():
    from alignforge.evaluate.stats import improvement_header, verdict

    assert verdict(0.01, 0.3) == "improved"
    assert verdict(-0.01, 0.3) == verdict(0.0, 0.3) == "no clear difference"  # 0 is inside
    assert verdict(-0.3, -0.01) == "worse"
    assert verdict(0.45, 0.7, null=0.5) == "no clear difference"  # a win rate against a coin
    assert verdict(0.55, 0.7, null=0.5) == "improved"
    assert improvement_header(["no clear difference", "improved"]) == "What improved"
    assert improvement_header(["no clear difference", "worse"]) == "No clear improvement"
    assert improvement_header([]) == "No clear improvement"
