import math

import pytest
import torch

from alignforge.losses.ppo import ppo_policy_loss, ppo_value_loss


def _one(ratio, adv, **kw):
    """Loss and gradient d loss / d logp for a single token with the given ratio."""
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out = ppo_policy_loss(logps, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), **kw)
    out.loss.backward()
    return out, logps.grad.item()


def test_hand_value():
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    old_logps = torch.tensor([[-1.0, -2.5, -0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    out = ppo_policy_loss(logps, old_logps, adv, torch.tensor([[1, 1, 0]]), clip_eps=0.2)
    # token 0: ratio 1 -> -1; token 1: ratio e^0.5 = 1.65, clipped to 1.2 -> -1.2; token 2 masked
    assert out.loss.item() == pytest.approx(-1.1)
    assert out.clipfrac.item() == 0.5
    assert out.approx_kl.item() == pytest.approx((math.exp(0.5) - 1 - 0.5) / 2, rel=1e-6)
    assert out.ratio_mean.item() == pytest.approx((1 + math.exp(0.5)) / 2, rel=1e-6)
    assert out.ratio_max.item() == pytest.approx(math.exp(0.5), rel=1e-6)


@pytest.mark.parametrize(
    ("ratio", "adv", "clipped"),
    [
        (1.5, 1.0, True),  # good token pushed past 1 + eps: no more push
        (0.5, -1.0, True),  # bad token pushed below 1 - eps: no more push
        (0.5, 1.0, False),  # good token made less likely: still corrected
        (1.5, -1.0, False),  # bad token made more likely: still corrected (pessimistic bound)
        (1.1, 1.0, False),
    ],
)
def test_gradient_zero_exactly_when_clipped(ratio, adv, clipped):
    out, grad = _one(ratio, adv, clip_eps=0.2)
    assert out.clipfrac.item() == float(clipped)
    if clipped:
        assert grad == 0.0
        assert out.loss.item() == pytest.approx(-adv * (1.2 if adv > 0 else 0.8))
    else:
        assert grad == pytest.approx(-adv * ratio, rel=1e-6)  # d(-A exp(logp)) / d logp


def test_clip_higher():
    out, grad = _one(1.25, 1.0, clip_eps=0.2, clip_eps_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25) and grad != 0.0
    out, grad = _one(1.25, 1.0, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(-1.2) and grad == 0.0


def test_dual_clip_bounds_negative_advantages():
    out, grad = _one(math.exp(2.0), -1.0, clip_eps=0.2, dual_clip=3.0)
    assert out.loss.item() == pytest.approx(3.0)  # min(7.39, 3 * 1)
    assert grad == 0.0 and out.dual_clipfrac.item() == 1.0
    out, _ = _one(math.exp(2.0), -1.0, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(math.exp(2.0), rel=1e-6)
    out, _ = _one(math.exp(2.0), 1.0, clip_eps=0.2, dual_clip=3.0)  # positive A untouched
    assert out.loss.item() == pytest.approx(-1.2) and out.dual_clipfrac.item() == 0.0


def test_is_weights_multiply_and_are_detached():
    logps = torch.zeros(1, 2, requires_grad=True)
    weights = torch.tensor([[0.5, 2.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0]])
    out = ppo_policy_loss(logps, torch.zeros(1, 2), adv, torch.ones(1, 2), is_weights=weights)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-(0.5 + 2.0) / 2)
    assert weights.grad is None
    assert logps.grad.tolist() == [[-0.25, -1.0]]


def test_bad_arguments():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(x, x, x, x, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(x, x, x, x, clip_eps=0.0)


def _batch(seed=0, b=6, t=10):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logps = old + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    lengths = torch.tensor([2, 10, 4, 7, 1, 9])
    mask = torch.arange(t)[None] < lengths[:, None]
    return logps, old, adv, mask


def test_micro_batches_with_global_num_tokens_equal_full_batch():
    logps, old, adv, mask = _batch()
    full_lp = logps.clone().requires_grad_(True)
    full = ppo_policy_loss(full_lp, old, adv, mask, dual_clip=3.0)
    full.loss.backward()
    n = int(mask.sum())
    acc_lp = logps.clone().requires_grad_(True)
    total = 0.0
    for a, b in [(0, 1), (1, 4), (4, 6)]:
        part = ppo_policy_loss(
            acc_lp[a:b], old[a:b], adv[a:b], mask[a:b], dual_clip=3.0, num_tokens=n
        )
        part.loss.backward()
        total = total + part.loss.detach()
    torch.testing.assert_close(total, full.loss.detach())
    torch.testing.assert_close(acc_lp.grad, full_lp.grad)


def test_sequence_mean_mode():
    logps, old, adv, mask = _batch(seed=3)
    out = ppo_policy_loss(logps, old, adv, mask, mode="seq_mean_token_mean")
    per_seq = [
        ppo_policy_loss(logps[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1]).loss
        for i in range(6)
    ]
    torch.testing.assert_close(out.loss, torch.stack(per_seq).mean())


def test_value_loss_hand_values():
    # token 0: v moved from 0 to 1 toward R = 1; clipped v = 0.2 -> 0.5 * 0.64 = 0.32 dominates
    # token 1: v = 1, old = 0.5, R = 0: unclipped 1 vs clipped (0.7)^2 = 0.49 -> 0.5 * 1
    values = torch.tensor([[1.0, 1.0]], requires_grad=True)
    out = ppo_value_loss(
        values, torch.tensor([[0.0, 0.5]]), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)
    )
    assert out.loss.item() == pytest.approx((0.32 + 0.5) / 2)
    assert out.clipfrac.item() == 0.5
    out.loss.backward()
    assert values.grad.tolist()[0][0] == 0.0  # clipped branch is constant in v
    assert values.grad.tolist()[0][1] == pytest.approx(0.5)  # 0.5 * 2 * (1 - 0) / 2


def test_value_loss_unclipped_and_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    perfect = ppo_value_loss(returns.clone(), returns, returns, mask, clip_eps=None)
    assert perfect.loss.item() == 0.0 and perfect.explained_variance.item() == pytest.approx(1.0)
    flat = ppo_value_loss(torch.full((1, 4), 2.5), returns, returns, mask, clip_eps=None)
    assert flat.explained_variance.item() == pytest.approx(0.0, abs=1e-6)
    assert flat.loss.item() == pytest.approx(0.5 * (2.25 + 0.25 + 0.25 + 2.25) / 4)


def test_value_loss_micro_batches():
    _, old, returns, mask = _batch(seed=5)
    values = old + 0.5
    full = ppo_value_loss(values, old, returns, mask).loss
    n = int(mask.sum())
    parts = ppo_value_loss(values[:2], old[:2], returns[:2], mask[:2], num_tokens=n).loss
    parts = parts + ppo_value_loss(values[2:], old[2:], returns[2:], mask[2:], num_tokens=n).loss
    torch.testing.assert_close(parts, full)
