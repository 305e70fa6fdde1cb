"""Hand values use one pair: logp_c = -5, logp_r = -9, ref_c = -6, ref_r = -8, so
h = (-5 + 6) - (-9 + 8) = 2 and, with beta = 0.1, z = beta * h = 0.2."""

import math

import pytest
import torch

from alignforge.losses.preference import (
    PREFERENCE_LOSSES,
    conservative_loss,
    dpo_loss,
    robust_loss,
    sigmoid_loss,
    spin_loss,
)


def _nls(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def _pair(**kw):
    t = torch.tensor
    return dpo_loss(t([-5.0]), t([-9.0]), t([-6.0]), t([-8.0]), beta=0.1, **kw)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"loss_type": "sigmoid"}, _nls(0.2)),
        ({"loss_type": "sigmoid", "margin": 0.2}, math.log(2.0)),
        ({"loss_type": "conservative", "label_smoothing": 0.1}, 0.9 * _nls(0.2) + 0.1 * _nls(-0.2)),
        (
            {"loss_type": "robust", "label_smoothing": 0.1},
            (0.9 * _nls(0.2) - 0.1 * _nls(-0.2)) / 0.8,
        ),
        ({"loss_type": "hinge"}, 0.8),  # relu(1 - 0.2)
        ({"loss_type": "ipo"}, 9.0),  # (2 - 1 / (2 * 0.1))^2
    ],
)
def test_hand_values(kw, expected):
    out = _pair(**kw)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.losses.shape == (1,)


def test_statistics():
    out = _pair()
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # 0.1 * (-5 + 6)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)
    assert out.margins.item() == pytest.approx(0.2)
    assert out.accuracies.item() == 1.0
    assert not out.chosen_rewards.requires_grad


def test_registry_dispatch_and_direct_calls_agree():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "hinge", "robust", "conservative"}
    torch.manual_seed(0)
    lc, lr, rc, rr = (torch.randn(6) for _ in range(4))
    h = (lc - rc) - (lr - rr)
    for name, fn in PREFERENCE_LOSSES.items():
        eps = 0.2 if name in ("robust", "conservative") else 0.0
        out = dpo_loss(lc, lr, rc, rr, beta=0.3, loss_type=name, label_smoothing=eps)
        torch.testing.assert_close(out.losses, fn(h, 0.3, eps, None))


def test_unknown_loss_type_names_the_allowed_values():
    with pytest.raises(ValueError, match="conservative, hinge, ipo, robust, sigmoid"):
        _pair(loss_type="kto")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"loss_type": "sigmoid", "label_smoothing": 0.1}, "conservative"),
        ({"loss_type": "ipo", "margin": 1.0}, "margin"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"loss_type": "conservative", "label_smoothing": 0.6}, r"\[0, 0.5\]"),
    ],
)
def test_unused_or_out_of_range_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _pair(**kw)


def test_shapes_checked_and_beta_positive():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*(torch.zeros(1),) * 4, beta=0.0)


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "robust"])
def test_monotone_decreasing_in_log_ratio_margin(name):
    h = torch.linspace(-5, 5, 41)
    eps = 0.2 if name == "robust" else 0.0
    losses = PREFERENCE_LOSSES[name](h, 0.5, eps, None)
    assert (losses[1:] <= losses[:-1]).all()
    if name != "hinge":  # hinge is flat (zero) beyond its margin
        assert (losses[1:] < losses[:-1]).all()


def test_cdpo_stops_pushing_at_its_optimum():
    # d/dz [-(1-eps) log s(z) - eps log s(-z)] = 0 at s(z) = 1 - eps, z* = log((1 - eps) / eps)
    eps, beta = 0.2, 1.0
    z_star = math.log((1 - eps) / eps)
    below = conservative_loss(torch.linspace(-4, z_star, 20), beta, eps)
    above = conservative_loss(torch.linspace(z_star, z_star + 4, 20), beta, eps)
    assert (below[1:] < below[:-1]).all() and (above[1:] > above[:-1]).all()


def test_ipo_decreasing_below_its_target_and_minimal_at_it():
    beta = 0.25
    h = torch.linspace(-2, 2, 21)  # target 1 / (2 beta) = 2
    losses = PREFERENCE_LOSSES["ipo"](h, beta, 0.0, None)
    assert (losses[1:] < losses[:-1]).all()
    assert losses[-1].item() == 0.0


def test_beta_scaling():
    torch.manual_seed(1)
    h = torch.randn(10)
    # sigmoid depends on beta * h only
    torch.testing.assert_close(sigmoid_loss(h, 0.1), sigmoid_loss(2 * h, 0.05))
    lc, lr, rc, rr = (torch.randn(4) for _ in range(4))
    a = dpo_loss(lc, lr, rc, rr, beta=0.1)
    b = dpo_loss(lc, lr, rc, rr, beta=0.3)
    torch.testing.assert_close(b.chosen_rewards, 3 * a.chosen_rewards)


def test_label_smoothing_zero_equals_sigmoid():
    h = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(conservative_loss(h, 0.2, 0.0), sigmoid_loss(h, 0.2))
    torch.testing.assert_close(robust_loss(h, 0.2, 0.0), sigmoid_loss(h, 0.2))


def test_cdpo_is_dpo_against_flipped_labels_and_rdpo_is_unbiased():
    h, eps = torch.linspace(-3, 3, 7), 0.2
    # cDPO: expected DPO loss when the label is flipped with probability eps
    flipped = (1 - eps) * sigmoid_loss(h, 0.5) + eps * sigmoid_loss(-h, 0.5)
    torch.testing.assert_close(conservative_loss(h, 0.5, eps), flipped)
    # rDPO: its expectation over noisy labels is the clean DPO loss
    expected_noisy = (1 - eps) * robust_loss(h, 0.5, eps) + eps * robust_loss(-h, 0.5, eps)
    torch.testing.assert_close(expected_noisy, sigmoid_loss(h, 0.5))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_micro_batch_accumulation_equals_full_batch(loss_type):
    torch.manual_seed(2)
    lc, lr = torch.randn(7), torch.randn(7)
    rc, rr = torch.randn(7), torch.randn(7)
    eps = 0.1 if loss_type == "robust" else 0.0
    kw = {"beta": 0.2, "loss_type": loss_type, "label_smoothing": eps}
    full_c = lc.clone().requires_grad_(True)
    full = dpo_loss(full_c, lr, rc, rr, **kw).loss
    full.backward()
    acc_c = lc.clone().requires_grad_(True)
    total = 0.0
    for a, b in [(0, 3), (3, 4), (4, 7)]:
        part = dpo_loss(acc_c[a:b], lr[a:b], rc[a:b], rr[a:b], num_pairs=7, **kw).loss
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(acc_c.grad, full_c.grad)


# SPIN: policy_real = -10, policy_gen = -12, opponent_real = -11, opponent_gen = -11.5, beta 0.1.
# h = (-10 - -11) - (-12 - -11.5) = 1 + 0.5 = 1.5, loss = log(1 + exp(-0.15)).
def _spin(policy_real=-10.0, **kw):
    t = torch.tensor
    return spin_loss(t([policy_real]), t([-12.0]), t([-11.0]), t([-11.5]), beta=0.1, **kw)


def test_spin_hand_value_uses_opponent_ground_truth_logps():
    loss = _spin().loss.item()
    assert loss == pytest.approx(_nls(0.15), rel=1e-6)
    # an implementation that feeds the opponent's *generated* log-probs in both reference slots
    # gets h = (-10 + 11.5) - (-12 + 11.5) = 2 instead
    assert loss != pytest.approx(_nls(0.2), rel=1e-3)


def test_spin_opponent_real_logps_change_the_loss():
    t = torch.tensor
    a = spin_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.5])).loss.item()
    b = spin_loss(t([-10.0]), t([-12.0]), t([-13.0]), t([-11.5])).loss.item()
    assert a != b
    # h = (policy_real - opponent_real) - (...): a higher opponent_real lowers h, raises the loss
    c = spin_loss(t([-10.0]), t([-12.0]), t([-10.5]), t([-11.5])).loss.item()
    assert c > a


def test_spin_sign_raising_policy_real_logp_lowers_loss():
    assert _spin(policy_real=-9.0).loss.item() < _spin(policy_real=-10.0).loss.item()
    pr = torch.tensor([-10.0], requires_grad=True)
    pg = torch.tensor([-12.0], requires_grad=True)
    out = spin_loss(pr, pg, torch.tensor([-11.0]), torch.tensor([-11.5]), beta=0.1)
    out.loss.backward()
    # d loss / d policy_real = -beta * sigmoid(-0.15) < 0; generated gets the opposite sign
    assert pr.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), rel=1e-6)
    assert pg.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.15)), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # beta * (policy - opponent), real


def test_spin_hinge_variant():
    assert _spin(loss_type="hinge").loss.item() == pytest.approx(1 - 0.15)
