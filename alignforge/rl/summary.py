"""What a PPO run reports: reward and KL curves, the first and last quarter's reward, step times."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PHASES = ("time/generate", "time/score", "time/prepare", "time/train")


def quarter_means(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last quarter (at least one value each)."""
    q = max(1, len(values) // 4)
    return float(np.mean(values[:q])), float(np.mean(values[-q:]))


def reward_summary(rows: list[dict]) -> dict:
    """Reward first/last quarter, the last KL and mean seconds per phase of the train rows."""
    rewards = [r["reward/mean"] for r in rows]
    first, last = quarter_means(rewards) if rewards else (float("nan"), float("nan"))
    timing = {k: float(np.mean([r[k] for r in rows])) for k in PHASES} if rows else {}
    return {
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "final_kl": rows[-1].get("kl") if rows else None,  # none without a reference pass
        "mean_step_seconds": timing,
    }


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("split") == "train"]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("reward/mean", "kl", "offpolicy/kl_k3"), strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("PPO step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_kl(kl: float | None, estimator: str | None) -> str:
    if kl is None:
        return "n/a"
    if estimator == "k1":  # mean of log(pi/pi_ref) over sampled tokens: unbiased, not >= 0
        return f"{kl:.4f} (k1 estimate: unbiased, so a small policy shift can read below 0)"
    return f"{kl:.4f} ({estimator} estimate)"


def print_summary(s: dict) -> None:
    lines = [
        f"PPO finished in {s['seconds']:.0f}s: {s['steps']}/{s['total_steps']} steps"
        f" on {s.get('processes', 1)} process(es)",
        f"  reward: first quarter {s['reward_first_quarter']:.4f} -> last quarter {s['reward_last_quarter']:.4f}",
        f"  KL to the reference, last batch: {_fmt_kl(s['final_kl'], s.get('kl_estimator'))}",
        "  mean seconds per step: "
        + ", ".join(f"{k[5:]} {v:.2f}" for k, v in s["mean_step_seconds"].items()),
    ]
    if s["drift_events"]:
        lines.append(f"  reward-drift events: {[e['event'] for e in s['drift_events']]}")
    if s["stopped"]:
        lines.append(f"  STOPPED: {s['stopped']}")
    lines.append(f"  policy adapter: {s['final_model']}")
    print("\n".join(lines))
