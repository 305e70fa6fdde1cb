"""Per-token KL estimators and KL-coefficient controllers for RLHF.

    >>> import torch
    >>> from alignforge.rl.kl import kl_penalty, AdaptiveKLController
    >>> logps, ref_logps = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    >>> kl_penalty(logps, ref_logps, kind="k1").tolist()
    [[0.5, -1.0]]
    >>> ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    >>> round(ctl.update(current_kl=12.0, n_steps=256), 5)      # KL above target: coef grows
    0.10051

The estimators are Schulman's (2020, "Approximating KL divergence") for ``KL(pi || ref)`` with
samples from ``pi``: with ``r = ref_logps - logps``,

* ``k1 = -r`` (unbiased, can be negative per token),
* ``k2 = r^2 / 2`` (biased, low variance),
* ``k3 = exp(r) - 1 - r`` (unbiased and always >= 0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_penalty(logps: Tensor, ref_logps: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from tokens sampled by ``pi``.

    ``r = ref_logps - logps``; ``k1 = -r``, ``k2 = r^2 / 2``, ``k3 = exp(r) - 1 - r``.
    Shapes: ``logps``, ``ref_logps`` ``(B, T)`` -> ``(B, T)`` (mask it yourself).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KL_KINDS)}")
    r = ref_logps - logps
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r**2
    # exp overflows for r > ~88 in fp32; such a token means the run has already diverged, but
    # an inf reward would turn every later statistic into nan, so cap it.
    return torch.exp(r.clamp(max=20.0)) - 1.0 - r


class FixedKLController:
    """Constant KL coefficient ``beta``; ``update`` is a no-op kept for a common interface."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"coef={coef} must be >= 0")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019, section 2.2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``:
    the coefficient grows while the measured KL exceeds ``target`` and shrinks below it.
    ``n_steps`` is the number of samples (episodes) since the last update, ``horizon`` the time
    constant in samples (Ziegler et al. use 10000).
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"init_coef={init_coef}, target={target}, horizon={horizon} must all be > 0"
            )
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
