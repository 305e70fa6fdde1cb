import math

import pytest
import torch

from alignforge.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty


def test_hand_values():
    logps, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])  # r = ref - logp = -0.5
    assert kl_penalty(logps, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logps, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(logps, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)


def test_k3_non_negative_and_zero_on_policy():
    torch.manual_seed(0)
    logps, ref = torch.randn(50), torch.randn(50)
    assert (kl_penalty(logps, ref, "k3") >= 0).all()
    assert kl_penalty(logps, logps, "k3").abs().max().item() == 0.0


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True)
    logps, ref = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        assert kl_penalty(logps, ref, kind).mean().item() == pytest.approx(true_kl, abs=0.01)


def test_unknown_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.value == 0.05


def test_adaptive_controller_ziegler_update():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # error clipped
    before = ctl.value
    assert ctl.update(6.0, 256) == pytest.approx(before)  # on target: unchanged
    assert ctl.update(5.4, 1000) == pytest.approx(before * (1 - 0.1 * 0.1))  # error -0.1
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.update(9.0, 10) == ctl.update(9.0, 10)


def test_adaptive_controller_rejects_bad_values():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 100)
