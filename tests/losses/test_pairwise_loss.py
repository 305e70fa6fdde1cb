import math

import pytest
import torch

from alignforge.losses.pairwise import bradley_terry_loss


def _nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_hand_value_with_centering():
    out = bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), center_coef=0.01)
    # pairs: -log s(1) and -log s(-0.5); centering 0.01 * mean((1 + 0)^2, (0.5 + 1)^2)
    expected = (_nls(1.0) + _nls(-0.5)) / 2 + 0.01 * (1.0 + 2.25) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.accuracy.item() == 0.5
    assert out.reward_margin.item() == pytest.approx(0.25)
    assert out.chosen_mean.item() == 0.75 and out.rejected_mean.item() == 0.5


def test_margin_shifts_the_logit():
    out = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)
    assert out.loss.item() == pytest.approx(math.log(2.0))
    per_pair = bradley_terry_loss(
        torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), margin=torch.tensor([1.0, 0.0])
    )
    assert per_pair.loss.item() == pytest.approx((math.log(2.0) + _nls(1.0)) / 2)


def test_ties_are_not_correct():
    out = bradley_terry_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    assert out.accuracy.item() == 0.5


def test_gradient_sign_and_value():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.1], requires_grad=True)
    bradley_terry_loss(chosen, rejected).loss.backward()
    # d/dr_c -log s(d) = -s(-d)
    assert chosen.grad.item() == pytest.approx(-1 / (1 + math.exp(0.2)), rel=1e-6)
    assert rejected.grad.item() == pytest.approx(1 / (1 + math.exp(0.2)), rel=1e-6)


def test_monotone_in_reward_difference():
    diffs = torch.linspace(-3, 3, 13)
    losses = [bradley_terry_loss(d.view(1), torch.zeros(1)).loss.item() for d in diffs]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))


def test_centering_pulls_rewards_to_zero():
    chosen = torch.tensor([5.0], requires_grad=True)
    rejected = torch.tensor([4.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected, center_coef=0.01).loss.backward()
    # centering adds 2 * 0.01 * 9 = 0.18 to both gradients: both rewards are pushed down
    assert rejected.grad.item() == pytest.approx(1 / (1 + math.exp(1.0)) + 0.18, rel=1e-5)


def test_micro_batches_with_num_pairs():
    torch.manual_seed(0)
    c, r = torch.randn(7), torch.randn(7)
    full = bradley_terry_loss(c, r, center_coef=0.05).loss
    parts = bradley_terry_loss(c[:2], r[:2], center_coef=0.05, num_pairs=7).loss
    parts = parts + bradley_terry_loss(c[2:], r[2:], center_coef=0.05, num_pairs=7).loss
    torch.testing.assert_close(parts, full)


def test_shape_error_names_both():
    with pytest.raises(ValueError, match="chosen_rewards"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
