"""Loss curves written at the end of training."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(rows: list[dict], path: str | Path, title: str = "loss") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [
        (r["step"], r["loss"])
        for r in rows
        if r.get("split") == "train" and isinstance(r.get("loss"), int | float)
    ]
    evals = [
        (r["step"], r["loss"])
        for r in rows
        if r.get("split") == "eval" and isinstance(r.get("loss"), int | float)
    ]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval")
    ax.set_ylabel("loss")
    ax.set_title(title)
    return save_figure(fig, [ax], "step", path)


def save_figure(fig, axes, xlabel: str, path: str | Path) -> Path:
    """Label, grid and legend every axis, save ``fig`` to ``path`` (PNG, 110 dpi) and close it."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
