"""Small matplotlib helpers (Agg, no pyplot state) shared by training stages and the report.

    from alignforge.evaluate.plots import plot_loss_curve, read_metrics
    plot_loss_curve(read_metrics("runs/sft/metrics.jsonl"), "runs/sft/loss.png")

Every function returns the PNG bytes and also writes them to ``path`` when given.
Metric rows follow the stage convention ``{"step": int, "split": "train"|"eval", ...}``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Rows = Sequence[Mapping[str, Any]]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``; a line cut by an interrupted run is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            rows.append(row)
    return rows


DPI = 90
# Figures fit the report's 1200-px column, so a 1366-px screen shows them at their own size.
MAX_WIDTH_IN = 13.0  # 1170 px at DPI
MAX_COLUMNS = 3


def _figure(n_panels: int = 1, width: float = 5.0, height: float = 3.2) -> tuple[Figure, list]:
    """A grid of ``n_panels`` panels, at most MAX_COLUMNS a row, no wider than MAX_WIDTH_IN."""
    cols = min(n_panels, MAX_COLUMNS)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(min(width * cols, MAX_WIDTH_IN), height * rows))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _finish(fig: Figure, path: str | Path | None) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def series(rows: Rows, key: str, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` over rows having a finite number for it (and ``split``)."""
    pts = [
        (r["step"], r[key])
        for r in rows
        if isinstance(r.get(key), int | float)
        and not isinstance(r.get(key), bool)
        and np.isfinite(r[key])
        and (split is None or r.get("split", "train") == split)
    ]
    if not pts:
        return np.array([]), np.array([])
    steps, vals = zip(*pts, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def plot_loss_curve(metrics_rows: Rows, path: str | Path | None = None, title: str = "") -> bytes:
    """Train loss and eval loss vs step; a learning-rate panel when ``lr``/``learning_rate`` is
    logged. Raises ValueError when no row has a loss."""
    tr = series(metrics_rows, "loss", "train")
    ev = series(metrics_rows, "loss", "eval")
    if not tr[0].size and not ev[0].size:
        raise ValueError("plot_loss_curve: no row has a numeric 'loss'")
    lr_key = next((k for k in ("lr", "learning_rate") if series(metrics_rows, k)[0].size), None)
    fig, axes = _figure(2 if lr_key else 1)
    ax = axes[0]
    if tr[0].size:
        ax.plot(*tr, color=COLORS[0], lw=1.2, label="train loss")
    if ev[0].size:
        ax.plot(*ev, "o-", color=COLORS[1], ms=4, label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title=title or "loss")
    ax.legend()
    if lr_key:
        axes[1].plot(*series(metrics_rows, lr_key), color=COLORS[2])
        axes[1].set(xlabel="step", ylabel=lr_key, title="learning rate")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _finish(fig, path)


def plot_series(
    rows: Rows,
    keys: Sequence[str],
    path: str | Path | None = None,
    title: str = "",
    marks: Sequence[float] = (),
    mark_label: str = "",
) -> bytes:
    """One panel per key (value vs step); ``marks`` are steps drawn as red vertical lines."""
    keys = [k for k in keys if series(rows, k)[0].size]
    if not keys:
        raise ValueError("plot_series: none of the keys has numeric values")
    fig, axes = _figure(len(keys), width=4.0)
    for i, (ax, k) in enumerate(zip(axes, keys, strict=True)):
        for split, style in (("train", "-"), ("eval", "o--")):
            s = series(rows, k, split)
            if s[0].size:
                ax.plot(
                    *s,
                    style,
                    color=COLORS[i % len(COLORS)],
                    lw=1.2,
                    ms=3,
                    label=split if split == "eval" else None,
                )
        for j, m in enumerate(marks):
            ax.axvline(m, color="red", alpha=0.35, lw=1, label=mark_label if j == 0 else None)
        ax.set(xlabel="step", title=k)
        if marks or series(rows, k, "eval")[0].size:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_histograms(
    groups: Mapping[str, Sequence[float]],
    path: str | Path | None = None,
    title: str = "",
    xlabel: str = "reward",
) -> bytes:
    """Overlaid density histograms on shared bins (e.g. reward on the RM eval set vs on policy
    samples)."""
    groups = {k: np.asarray(v, dtype=float) for k, v in groups.items() if len(v)}
    if not groups:
        raise ValueError("plot_histograms: no values")
    allv = np.concatenate(list(groups.values()))
    allv = allv[np.isfinite(allv)]
    bins = np.histogram_bin_edges(allv, bins=40) if allv.size else 10
    fig, (ax,) = _figure(1, width=6.0)
    for i, (label, v) in enumerate(groups.items()):
        ax.hist(
            v[np.isfinite(v)],
            bins=bins,
            density=True,
            alpha=0.45,
            color=COLORS[i % len(COLORS)],
            label=f"{label} (n={len(v)})",
        )
    ax.set(xlabel=xlabel, ylabel="density", title=title)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_estimates(
    labels: Sequence[str],
    estimates: Sequence[Sequence[float]],
    path: str | Path | None = None,
    title: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
) -> bytes:
    """Bars with error bars from (value, low, high) triples."""
    est = np.asarray(estimates, dtype=float).reshape(-1, 3)
    fig, (ax,) = _figure(1, width=max(4.0, 0.9 * len(labels) + 2))
    x = np.arange(len(labels))
    yerr = np.vstack([est[:, 0] - est[:, 1], est[:, 2] - est[:, 0]]).clip(min=0)
    ax.bar(
        x, est[:, 0], yerr=yerr, capsize=4, color=[COLORS[i % len(COLORS)] for i in range(len(x))]
    )
    ax.set_xticks(
        x,
        labels,
        rotation=20 if len(labels) > 4 else 0,
        ha="right" if len(labels) > 4 else "center",
    )
    ax.set(title=title, ylabel=ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    return _finish(fig, path)


def plot_win_tie_loss(
    comparisons: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[float]]],
    path: str | Path | None = None,
    title: str = "blind test",
) -> bytes:
    """Grouped win / tie / loss bars with CI error bars, one group per comparison label."""
    fig, (ax,) = _figure(1, width=max(5.0, 2.2 * len(comparisons) + 2))
    x = np.arange(len(comparisons))
    width = 0.26
    for j, (name, color) in enumerate(
        (("win", "#2ca02c"), ("tie", "#999999"), ("loss", "#d62728"))
    ):
        est = np.array([c[1 + j] for c in comparisons], dtype=float).reshape(-1, 3)
        yerr = np.vstack([est[:, 0] - est[:, 1], est[:, 2] - est[:, 0]]).clip(min=0)
        ax.bar(x + (j - 1) * width, est[:, 0], width, yerr=yerr, capsize=3, color=color, label=name)
        for xi, v in zip(x, est[:, 0], strict=True):
            ax.text(
                xi + (j - 1) * width,
                v / 2,
                f"{100 * v:.0f}%",
                ha="center",
                fontsize=8,
                color="white",
            )
    ax.set_xticks(x, [c[0] for c in comparisons])
    ax.set(ylim=(0, 1), ylabel="rate", title=title)
    ax.legend()
    return _finish(fig, path)


def plot_metric_by_round(
    per_system: Mapping[str, Sequence[tuple[float, Sequence[float]]]],
    path: str | Path | None = None,
    title: str = "",
    ylabel: str = "",
) -> bytes:
    """Metric vs round with CI error bars, one line per system: {name: [(round, (v, lo, hi))]}."""
    fig, (ax,) = _figure(1, width=6.0)
    for i, (name, pts) in enumerate(per_system.items()):
        pts = sorted(pts, key=lambda p: p[0])
        # a small horizontal offset per system keeps overlapping error bars readable
        r = np.array([p[0] for p in pts], dtype=float) + 0.04 * (i - (len(per_system) - 1) / 2)
        est = np.array([p[1] for p in pts], dtype=float).reshape(-1, 3)
        yerr = np.vstack([est[:, 0] - est[:, 1], est[:, 2] - est[:, 0]]).clip(min=0)
        ax.errorbar(
            r, est[:, 0], yerr=yerr, fmt="o-", capsize=4, color=COLORS[i % len(COLORS)], label=name
        )
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.set_xticks(sorted({p[0] for pts in per_system.values() for p in pts}))
    ax.legend(fontsize=8)
    return _finish(fig, path)
