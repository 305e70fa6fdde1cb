import math

import pytest
import torch

from alignforge.losses.logprobs import (
    selective_log_softmax,
    sequence_logps,
    shifted_token_logps,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_full_log_softmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50, dtype=dtype) * 4
    index = torch.randint(0, 50, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_selective_log_softmax_half_precision_is_exact():
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 30) * 4).to(torch.bfloat16)
    index = torch.randint(0, 30, (2, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(selective_log_softmax(logits, index), expected)


def test_selective_log_softmax_has_gradient():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    index = torch.randint(0, 7, (2, 3))
    selective_log_softmax(logits, index).sum().backward()
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).sum()
    (grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(logits.grad, grad)


def test_selective_log_softmax_shape_mismatch():
    with pytest.raises(ValueError, match="disagree"):
        selective_log_softmax(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def _hand_logits():
    """Position 0: probs (1/4, 1/4, 1/2); position 1: probs (3/5, 1/5, 1/5); position 2 unused."""
    return torch.tensor(
        [[[0.0, 0.0, math.log(2.0)], [math.log(3.0), 0.0, 0.0], [50.0, -50.0, 0.0]]]
    )


def test_shift_position_t_predicts_label_t_plus_1():
    labels = torch.tensor([[0, 2, 1]])
    out = shifted_token_logps(_hand_logits(), labels)
    # logp[0] = log p_0(label_1 = 2) = log 1/2; logp[1] = log p_1(label_2 = 1) = log 1/5
    torch.testing.assert_close(out.logps, torch.tensor([[math.log(0.5), math.log(0.2)]]))
    assert out.mask.tolist() == [[True, True]]
    # without the shift one would read log p_0(0) = log 1/4 and log p_1(2) = log 1/5
    assert out.logps[0, 0].item() != pytest.approx(math.log(0.25))


def test_ignore_index_masks_and_zeroes():
    labels = torch.tensor([[0, -100, 1]])
    out = shifted_token_logps(_hand_logits(), labels)
    assert out.mask.tolist() == [[False, True]]
    assert out.logps[0, 0].item() == 0.0
    assert out.logps[0, 1].item() == pytest.approx(math.log(0.2))


def test_sequence_logps_sum_and_average():
    token_logps = torch.tensor([[-1.0, -2.0, -7.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_logps(token_logps, mask).tolist() == [-3.0, -4.0]
    assert sequence_logps(token_logps, mask, average=True).tolist() == [-1.5, -4.0]


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("chunk", [3, 100])
def test_linear_token_logps_matches_full_log_softmax_values_and_gradients(head_trains, chunk):
    from alignforge.losses.logprobs import linear_token_logps

    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=head_trains)
    b = torch.randn(11, requires_grad=head_trains)
    ids = torch.randint(0, 11, (7,))
    got = linear_token_logps(h, w, b, ids, chunk=chunk)
    want = torch.log_softmax(h @ w.T + b, -1).gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(got, want)
    upstream = torch.randn(7)  # per-token weights, as DPO's per-sequence gradients give
    params = (h, w, b) if head_trains else (h,)
    g1 = torch.autograd.grad((got * upstream).sum(), params)
    g2 = torch.autograd.grad((want * upstream).sum(), params)
    for a, e in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, e)


def test_linear_token_logps_hand_computed():
    from alignforge.losses.logprobs import linear_token_logps

    # one row h = [1, 0], head rows [0, 0], [1, 0], [0, 1] -> logits [0, 1, 0]
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = linear_token_logps(h, w, None, torch.tensor([1]))
    e = math.e
    assert abs(float(got) - (1 - math.log(2 + e))) < 1e-6
    got.sum().backward()
    # d logp / d h = W_1 - softmax . W = [1, 0] - ([e, 1] / (2 + e))
    want = torch.tensor([1 - e / (2 + e), -1 / (2 + e)])
    torch.testing.assert_close(h.grad[0], want)
