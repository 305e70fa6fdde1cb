"""KTO. Hand values: answer 0 desirable with logp -5, ref -6 (r = 1); answer 1 undesirable with
logp -9, ref -8 (r = -1); mismatched pairs with logp - ref = 0.5 and 0.5, so z0 = 0.5; beta 0.1.
Desirable: 1 - sigmoid(0.1 * (1 - 0.5)) = 1 - sigmoid(0.05); undesirable:
1 - sigmoid(0.1 * (0.5 + 1)) = 1 - sigmoid(0.15)."""

import math

import pytest
import torch

from alignforge.losses.kto import kto_kl, kto_loss

LOGPS, REF = torch.tensor([-5.0, -9.0]), torch.tensor([-6.0, -8.0])
LABELS = torch.tensor([True, False])


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_reference_point_is_the_clamped_detached_mean():
    kl_logps = torch.tensor([-7.0, -9.0], requires_grad=True)
    z0 = kto_kl(kl_logps, torch.tensor([-7.5, -9.5]))
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad
    assert kto_kl(torch.tensor([-9.0]), torch.tensor([-7.0])).item() == 0.0  # clamped at 0


def test_hand_values_and_weights():
    out = kto_loss(LOGPS, REF, LABELS, 0.5, beta=0.1)
    d, u = 1 - _sig(0.05), 1 - _sig(0.15)
    torch.testing.assert_close(out.losses, torch.tensor([d, u]))
    assert out.loss.item() == pytest.approx((d + u) / 2, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.47503, abs=1e-5)
    torch.testing.assert_close(out.rewards, torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(out.margins, torch.tensor([0.05, 0.15]))
    weighted = kto_loss(LOGPS, REF, LABELS, 0.5, beta=0.1, desirable_weight=2.0,
                        undesirable_weight=0.5)  # fmt: skip
    assert weighted.loss.item() == pytest.approx((2 * d + 0.5 * u) / 2, rel=1e-6)


def test_gradients_raise_desirable_and_lower_undesirable_answers_not_the_reference_point():
    logps = LOGPS.clone().requires_grad_(True)
    kl_logps = torch.tensor([-7.0, -9.0], requires_grad=True)
    z0 = kto_kl(kl_logps, torch.tensor([-7.5, -9.5]))
    kto_loss(logps, REF, LABELS, z0, beta=0.1).loss.backward()
    assert logps.grad[0] < 0 < logps.grad[1]  # gradient descent raises 0, lowers 1
    assert kl_logps.grad is None


def test_a_larger_reference_point_makes_desirable_answers_costlier():
    """z0 is the bar an answer's reward is measured against: raising it raises the desirable
    loss and lowers the undesirable one."""
    lo, hi = (kto_loss(LOGPS, REF, LABELS, z, beta=0.1).losses for z in (0.0, 2.0))
    assert hi[0] > lo[0] and hi[1] < lo[1]


def test_micro_batches_sum_to_the_full_batch():
    torch.manual_seed(0)
    logps, ref = torch.randn(6) - 5, torch.randn(6) - 5
    labels = torch.tensor([True, False, True, True, False, False])
    full = kto_loss(logps, ref, labels, 0.3, beta=0.2).loss
    parts = sum(
        kto_loss(logps[s], ref[s], labels[s], 0.3, beta=0.2, num_examples=6).loss
        for s in (slice(0, 2), slice(2, 6))
    )
    torch.testing.assert_close(parts, full)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: kto_loss(LOGPS, REF, LABELS, 0.0, beta=0.0), "beta"),
        (lambda: kto_loss(LOGPS, REF, LABELS, 0.0, desirable_weight=0.0), "desirable_weight"),
        (lambda: kto_loss(LOGPS, REF[:1], LABELS, 0.0), r"same shape \(B,\)"),
        (lambda: kto_kl(torch.tensor([]), torch.tensor([])), "non-empty"),
    ],
)
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
