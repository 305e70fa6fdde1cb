"""SimPO and ORPO. Hand values use one pair of length-averaged log-probs: logp_c = -0.5,
logp_r = -1.5, so h = logp_c - logp_r = 1."""

import math

import pytest
import torch

from alignforge.losses.preference import sigmoid_loss
from alignforge.losses.reference_free import log1mexp, orpo_loss, simpo_loss

C, R = torch.tensor([-0.5]), torch.tensor([-1.5])


def _nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def test_simpo_hand_values():
    """beta = 2, gamma = 1: -log sigmoid(2 * 1 - 1) = log(1 + e^-1) = 0.3133; cpo_alpha = 0.5
    adds 0.5 * 0.5 (the chosen answer's NLL per token)."""
    out = simpo_loss(C, R, beta=2.0, gamma=1.0)
    assert out.loss.item() == pytest.approx(_nls(1.0), rel=1e-6)
    assert out.loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-1.0)  # beta * logp_c
    assert out.margins.item() == pytest.approx(2.0) and out.accuracies.item() == 1.0
    assert out.logits.item() == pytest.approx(1.0)
    both = simpo_loss(C, R, beta=2.0, gamma=1.0, cpo_alpha=0.5)
    assert both.loss.item() == pytest.approx(_nls(1.0) + 0.25, rel=1e-6)
    assert both.nll.item() == pytest.approx(0.5) and not both.nll.requires_grad


def test_simpo_is_dpo_without_reference_and_with_margin_gamma():
    torch.manual_seed(0)
    c, r = -torch.rand(7) * 3, -torch.rand(7) * 3
    out = simpo_loss(c, r, beta=2.5, gamma=1.2)
    torch.testing.assert_close(out.losses, sigmoid_loss(c - r, 2.5, margin=1.2))


def test_simpo_properties():
    """The loss falls as the chosen answer gains and grows with the target margin gamma."""
    losses = [simpo_loss(torch.tensor([c]), R, 2.0, 1.0).loss.item() for c in (-1.5, -1.0, -0.5)]
    assert losses[0] > losses[1] > losses[2]
    gammas = [simpo_loss(C, R, 2.0, g).loss.item() for g in (0.0, 0.5, 1.0)]
    assert gammas[0] < gammas[1] < gammas[2]


def test_orpo_hand_value():
    """odds(p) = p / (1 - p) with p = e^logp: log odds ratio = log(odds(e^-0.5) / odds(e^-1.5))
    = 1 - log(1 - e^-0.5) + log(1 - e^-1.5) = 1.6803; loss = 0.5 - 0.1 log sigmoid(1.6803)
    = 0.5 + 0.1 * 0.1708 = 0.5171."""
    pc, pr = math.exp(-0.5), math.exp(-1.5)
    log_odds = math.log((pc / (1 - pc)) / (pr / (1 - pr)))
    out = orpo_loss(C, R, beta=0.1)
    assert out.logits.item() == pytest.approx(log_odds, rel=1e-6)
    assert log_odds == pytest.approx(1.68027, abs=1e-5)
    assert out.loss.item() == pytest.approx(0.5 + 0.1 * _nls(log_odds), rel=1e-6)
    assert out.loss.item() == pytest.approx(0.51708, abs=1e-5)
    assert out.nll.item() == pytest.approx(0.5)
    assert out.chosen_rewards.item() == pytest.approx(-0.05)  # beta * logp_c, as TRL


def test_orpo_gradient_signs_and_equal_answers():
    """Raising the chosen log-prob lowers the loss, raising the rejected one raises it. Equal
    answers: odds ratio 1, loss = NLL + beta * log 2."""
    c, r = C.clone().requires_grad_(True), R.clone().requires_grad_(True)
    orpo_loss(c, r, beta=0.5).loss.backward()
    assert c.grad.item() < 0 < r.grad.item()
    same = orpo_loss(C, C, beta=0.5)
    assert same.loss.item() == pytest.approx(0.5 + 0.5 * math.log(2), rel=1e-6)


def test_log1mexp_is_accurate_near_zero_and_far_below():
    x = torch.tensor([-1e-7, -1e-3, -0.6931, -0.7, -5.0, -40.0], dtype=torch.float64)
    want = [math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(want, dtype=torch.float64))
    # float32 near 0 stays finite (log1p(-exp(x)) would be log(0) = -inf at x = -1e-9)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-9]))).all()
    # neither branch leaks a NaN into the gradient, on either side of -log 2
    x = torch.tensor([-1e-9, -0.5, -30.0], requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("fn", [simpo_loss, orpo_loss])
def test_micro_batches_sum_to_the_full_batch(fn):
    torch.manual_seed(1)
    c, r = -torch.rand(6) * 2 - 0.01, -torch.rand(6) * 2 - 0.01
    full = fn(c, r, beta=0.7).loss
    halves = (
        fn(c[:2], r[:2], beta=0.7, num_pairs=6).loss + fn(c[2:], r[2:], beta=0.7, num_pairs=6).loss
    )
    torch.testing.assert_close(halves, full)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: simpo_loss(C, R, beta=0.0), "beta"),
        (lambda: simpo_loss(C, R, cpo_alpha=-1.0), "cpo_alpha"),
        (lambda: orpo_loss(C, torch.tensor([-1.0, -2.0])), r"same shape \(B,\)"),
    ],
)
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
