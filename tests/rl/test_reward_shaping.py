import pytest
import torch

from alignforge.rl.kl import kl_penalty
from alignforge.rl.rewards import last_valid_index, shape_rewards


def test_hand_values_left_and_right_padding_with_missing_eos():
    scores = torch.tensor([1.0, 2.0])
    logps = torch.tensor([[-1.0, -1.0, 0.0], [0.0, -2.0, -1.0]])
    ref_logps = torch.tensor([[-1.5, -1.0, 0.0], [0.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = shape_rewards(
        scores,
        logps,
        ref_logps,
        mask,
        kl_coef=0.1,
        eos_found=torch.tensor([True, False]),
        missing_eos_penalty=1.0,
    )
    # row 0: k1 = (0.5, 0); score 1 at position 1. row 1: k1 = (-1, 0); score 2 - 1 at position 2
    torch.testing.assert_close(out.kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    torch.testing.assert_close(
        out.token_rewards, torch.tensor([[-0.05, 1.0, 0.0], [0.0, 0.1, 1.0]])
    )
    torch.testing.assert_close(out.non_score_reward, torch.tensor([-0.05, 0.1]))


def test_k3_kind_and_no_gradient():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    out = shape_rewards(
        torch.tensor([0.0]), logps, ref, torch.ones(1, 2), kl_coef=0.5, kl_kind="k3"
    )
    torch.testing.assert_close(out.kl, kl_penalty(logps.detach(), ref, "k3"))
    assert not out.token_rewards.requires_grad


def test_last_valid_index_and_empty_row():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    assert last_valid_index(mask).tolist() == [1, 3, 2]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_valid_index(torch.tensor([[1, 0], [0, 0]]))


def test_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="eos_found"):
        shape_rewards(torch.zeros(2), x, x, torch.ones(2, 3), 0.1, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="scores"):
        shape_rewards(torch.zeros(3), x, x, torch.ones(2, 3), 0.1)
