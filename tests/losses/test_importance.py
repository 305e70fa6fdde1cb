"""Hand-built batch (probabilities, so every ratio is exact):

row 0: trainer p = (0.5, 0.9, 0.2), behaviour p = (0.5, 0.3, 0.4): token ratios (1, 3, 0.5)
row 1: trainer p = (0.3, 0.4),      behaviour p = (0.2, 0.8):      token ratios (1.5, 0.5)
sequence ratios: row 0 = 1 * 3 * 0.5 = 1.5, row 1 = 1.5 * 0.5 = 0.75
geometric ratios: row 0 = 1.5 ** (1/3) = 1.1447, row 1 = 0.75 ** (1/2) = 0.8660
Padding holds NaN to prove it never leaks.
"""

import math

import pytest
import torch

from alignforge.losses.importance import importance_weights, offpolicy_diagnostics
from alignforge.losses.ppo import ppo_policy_loss
from alignforge.losses.reduce import masked_mean

NAN = float("nan")
OLD = torch.log(torch.tensor([[0.5, 0.9, 0.2, NAN], [0.3, 0.4, NAN, NAN]]))
ROLLOUT = torch.log(torch.tensor([[0.5, 0.3, 0.4, NAN], [0.2, 0.8, NAN, NAN]]))
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
SEQ = (1.5, 0.75)
GEO = (1.5 ** (1 / 3), 0.75**0.5)


def _close(t, expected):
    torch.testing.assert_close(t, torch.tensor(expected, dtype=t.dtype), rtol=1e-5, atol=1e-6)


def _iw(**kw):
    return importance_weights(OLD, ROLLOUT, MASK, **kw)


def test_token_truncate():
    out = _iw(level="token", mode="truncate", upper=2.0)
    _close(out.weights, [[1.0, 2.0, 0.5, 0.0], [1.5, 0.5, 0.0, 0.0]])
    assert torch.equal(out.mask, MASK)
    assert out.diagnostics.frac_truncated.item() == pytest.approx(1 / 5)
    assert out.diagnostics.frac_masked.item() == 0.0


def test_token_truncate_with_lower_bound():
    out = _iw(level="token", mode="truncate", lower=0.8, upper=2.0)
    _close(out.weights, [[1.0, 2.0, 0.8, 0.0], [1.5, 0.8, 0.0, 0.0]])
    assert out.diagnostics.frac_truncated.item() == pytest.approx(3 / 5)


def test_token_mask_removes_tokens_and_keeps_ratio():
    out = _iw(level="token", mode="mask", lower=0.8, upper=2.0)
    _close(out.mask, [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    _close(out.weights, [[1.0, 0.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0]])
    assert out.mask.dtype == MASK.dtype
    assert out.diagnostics.frac_masked.item() == pytest.approx(3 / 5)
    ones = _iw(level="token", mode="mask", lower=0.8, upper=2.0, keep_ratio=False)
    _close(ones.weights, [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_token_none():
    out = _iw(level="token", mode="none")
    _close(out.weights, [[1.0, 3.0, 0.5, 0.0], [1.5, 0.5, 0.0, 0.0]])
    assert torch.equal(out.mask, MASK)


def test_sequence_truncate_and_mask():
    out = _iw(level="sequence", mode="truncate", upper=1.2)
    _close(out.weights, [[1.2, 1.2, 1.2, 0.0], [0.75, 0.75, 0.0, 0.0]])
    assert out.diagnostics.frac_truncated.item() == pytest.approx(3 / 5)
    out = _iw(level="sequence", mode="mask", lower=0.8, upper=2.0)
    _close(out.mask, [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # row 1 (0.75) rejected whole
    _close(out.weights, [[1.5, 1.5, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert out.diagnostics.frac_masked.item() == pytest.approx(2 / 5)


def test_geometric_truncate_and_mask():
    g0, g1 = GEO
    out = _iw(level="geometric", mode="truncate", upper=1.0)
    _close(out.weights, [[1.0, 1.0, 1.0, 0.0], [g1, g1, 0.0, 0.0]])
    out = _iw(level="geometric", mode="mask", lower=0.85, upper=1.1)
    _close(out.mask, [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # row 0 (1.14) rejected
    _close(out.weights, [[0.0, 0.0, 0.0, 0.0], [g1, g1, 0.0, 0.0]])
    assert g0 > 1.1


def test_diagnostics_hand_values():
    d = offpolicy_diagnostics(OLD, ROLLOUT, MASK)
    ratios = [1.0, 3.0, 0.5, 1.5, 0.5]
    logs = [math.log(r) for r in ratios]
    assert d.kl_k1.item() == pytest.approx(-sum(logs) / 5, rel=1e-5)
    assert d.kl_k3.item() == pytest.approx(
        sum(r - 1 - lr for r, lr in zip(ratios, logs, strict=True)) / 5, rel=1e-5
    )
    assert d.weight_mean.item() == pytest.approx(6.5 / 5)
    assert d.weight_max.item() == pytest.approx(3.0) and d.weight_min.item() == pytest.approx(0.5)
    assert d.ess.item() == pytest.approx(6.5**2 / (5 * 12.75), rel=1e-5)
    assert d.delta_p_max.item() == pytest.approx(0.6, rel=1e-5)
    assert d.delta_p_mean.item() == pytest.approx(1.3 / 5, rel=1e-5)
    row0 = -(math.log(3.0) + math.log(0.5)) / 3
    row1 = -(math.log(1.5) + math.log(0.5)) / 2
    assert d.log_ppl_diff.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    assert all(math.isfinite(v) for v in d.as_dict().values())


def test_sequence_level_weight_statistics_are_per_sequence():
    d = _iw(level="sequence", mode="none").diagnostics
    assert d.weight_mean.item() == pytest.approx(sum(SEQ) / 2)
    assert d.ess.item() == pytest.approx(sum(SEQ) ** 2 / (2 * (1.5**2 + 0.75**2)), rel=1e-5)


def test_as_dict_prefix():
    d = _iw().diagnostics.as_dict(prefix="rollout/")
    assert set(d) >= {
        "rollout/kl_k3",
        "rollout/ess",
        "rollout/frac_masked",
        "rollout/frac_truncated",
    }
    assert all(isinstance(v, float) for v in d.values())


def test_on_policy_is_identity():
    out = importance_weights(OLD, OLD, MASK, mode="mask", lower=0.5, upper=2.0)
    torch.testing.assert_close(out.weights, MASK)
    d = out.diagnostics
    assert d.kl_k1.item() == 0.0 and d.kl_k3.item() == 0.0 and d.ess.item() == pytest.approx(1.0)


def test_rejection_changes_the_denominator():
    """Masking removes tokens from the token mean; zero weights would keep them as zeros."""
    torch.manual_seed(0)
    per_token = torch.rand(2, 4) + 1.0
    out = _iw(level="token", mode="mask", lower=0.8, upper=2.0)
    ours = masked_mean(per_token * out.weights, out.mask)
    zeroed = masked_mean(per_token * out.weights, MASK)  # same weights, old denominator (5)
    assert ours.item() == pytest.approx((per_token[0, 0] * 1.0 + per_token[1, 0] * 1.5).item() / 2)
    assert zeroed.item() == pytest.approx(ours.item() * 2 / 5)
    # and the same holds through the PPO loss: pass both weights and the new mask
    logps = torch.zeros(2, 4)
    adv = torch.ones(2, 4)
    loss = ppo_policy_loss(logps, logps, adv, out.mask, is_weights=out.weights).loss
    assert loss.item() == pytest.approx(-(1.0 + 1.5) / 2)


def test_huge_sequence_ratio_stays_finite():
    old = torch.zeros(1, 200)
    rollout = torch.full((1, 200), -1.0)  # summed log ratio 200
    out = importance_weights(old, rollout, torch.ones(1, 200), level="sequence", mode="none")
    assert torch.isfinite(out.weights).all()
    assert all(math.isfinite(v) for v in out.diagnostics.as_dict().values())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"level": "chunk"}, "level"),
        ({"mode": "clip"}, "mode"),
        ({"mode": "mask", "lower": None, "upper": None}, "nothing would be masked"),
        ({"mode": "truncate", "upper": None}, "upper"),
        ({"lower": 2.0, "upper": 1.0}, "smaller"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _iw(**kw)


def test_sequence_and_geometric_none():
    g0, g1 = GEO
    out = _iw(level="sequence", mode="none")
    _close(out.weights, [[1.5, 1.5, 1.5, 0.0], [0.75, 0.75, 0.0, 0.0]])
    out = _iw(level="geometric", mode="none")
    _close(out.weights, [[g0, g0, g0, 0.0], [g1, g1, 0.0, 0.0]])
    assert torch.equal(out.mask, MASK)


def test_mask_mode_statistics_cover_the_kept_tokens_only():
    """Token level, band [0.8, 2]: ratios (1, 3, 0.5 | 1.5, 0.5) keep 1.0 and 1.5. Counting the
    three rejected tokens as weight 0 would give min 0, mean 2.5/5 and ESS 6.25/16.25."""
    d = _iw(level="token", mode="mask", lower=0.8, upper=2.0).diagnostics
    assert d.weight_min.item() == pytest.approx(1.0)
    assert d.weight_max.item() == pytest.approx(1.5)
    assert d.weight_mean.item() == pytest.approx(1.25)
    assert d.weight_std.item() == pytest.approx(0.25)
    assert d.ess.item() == pytest.approx(2.5**2 / (2 * (1.0 + 2.25)))  # 0.961538...
    assert d.frac_masked.item() == pytest.approx(3 / 5)
    # the mismatch estimates still see every valid token
    assert d.kl_k1.item() == pytest.approx(-math.log(3.0 * 0.5 * 1.5 * 0.5) / 5, rel=1e-5)
    ones = _iw(level="token", mode="mask", lower=0.8, upper=2.0, keep_ratio=False).diagnostics
    assert (ones.weight_min.item(), ones.weight_mean.item(), ones.ess.item()) == (1.0, 1.0, 1.0)


def test_sequence_mask_statistics_cover_the_kept_sequences_only():
    """Sequence ratios (1.5, 0.75), band [0.8, 2]: only row 0 (1.5) stays."""
    d = _iw(level="sequence", mode="mask", lower=0.8, upper=2.0).diagnostics
    assert d.weight_min.item() == pytest.approx(1.5) and d.weight_max.item() == pytest.approx(1.5)
    assert d.weight_mean.item() == pytest.approx(1.5) and d.weight_std.item() == 0.0
    assert d.ess.item() == pytest.approx(1.0)
    everything = _iw(level="sequence", mode="mask", lower=2.0, upper=3.0).diagnostics
    assert everything.frac_masked.item() == 1.0  # nothing kept: statistics of no sample are 0
    assert everything.weight_mean.item() == 0.0 and everything.ess.item() == 0.0
