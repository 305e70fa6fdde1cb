import pytest
import torch

from alignforge.losses.reduce import masked_mean, masked_var
from alignforge.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


def _reference_gae(rewards, values, mask, gamma, lam):
    """Plain double loop over rows and their valid positions."""
    b, t = rewards.shape
    adv = [[0.0] * t for _ in range(b)]
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        running, next_value = 0.0, 0.0
        for j in reversed(idx):
            delta = float(rewards[i, j]) + gamma * next_value - float(values[i, j])
            running = delta + gamma * lam * running
            adv[i][j] = running
            next_value = float(values[i, j])
    return torch.tensor(adv)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_double_loop_with_left_right_padding_and_holes(gamma, lam):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 12
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    pos = torch.arange(t)[None]
    mask = torch.stack(
        [
            pos[0] < 7,  # right padding
            pos[0] >= 4,  # left padding
            (pos[0] >= 2) & (pos[0] < 10),  # both
            torch.ones(t, dtype=torch.bool),
            torch.rand(t, generator=g) > 0.4,  # holes
            torch.zeros(t, dtype=torch.bool),  # empty row
        ]
    )
    out = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = _reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(out.advantages, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.returns, torch.where(mask, expected + values, 0.0), rtol=1e-5, atol=1e-5
    )


def test_gae_hand_value():
    out = gae(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), gamma=0.9, lam=0.5
    )
    # delta_1 = 1 - 0.2 = 0.8; delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.45 * 0.8
    torch.testing.assert_close(out.advantages, torch.tensor([[-0.32 + 0.45 * 0.8, 0.8]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.04 + 0.5, 1.0]]))


def test_gae_shape_error():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_grpo_hand_values():
    scores = torch.tensor([1.0, 0.0, 2.0, 2.0, 3.0, 0.0])
    adv = grpo_advantages(scores, group_size=2)
    s = 2**-0.5  # unbiased std of a pair (a, b) is |a - b| / sqrt(2)
    torch.testing.assert_close(
        adv,
        torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0, 1.5 / (3 * s), -1.5 / (3 * s)]),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(
        grpo_advantages(scores, 2, scale=False), torch.tensor([0.5, -0.5, 0, 0, 1.5, -1.5])
    )


def test_rloo_hand_values():
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    torch.testing.assert_close(adv, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_size_must_divide(fn):
    with pytest.raises(ValueError, match="group_size=4"):
        fn(torch.zeros(6), 4)


def test_reinforce_pp_returns_then_global_whitening():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]])
    out = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    torch.testing.assert_close(
        out.returns, torch.tensor([[0.25, 0.5, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    )
    assert masked_mean(out.advantages, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out.advantages, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert out.advantages[0, 3].item() == 0.0


def test_registry_adapters():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_pp"}
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = compute_advantages("grpo", rewards, mask, group_size=2)
    expected = grpo_advantages(torch.tensor([1.0, 3.0]), 2)
    torch.testing.assert_close(out.advantages, torch.where(mask.bool(), expected[:, None], 0.0))
    out = compute_advantages("gae", rewards, mask, values=torch.zeros(2, 3), lam=1.0)
    torch.testing.assert_close(out.advantages[1], torch.tensor([3.0, 3.0, 3.0]))
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages("rloo", rewards, mask)
    with pytest.raises(ValueError, match="gae, grpo, rloo, reinforce_pp"):
        compute_advantages("vtrace", rewards, mask)
