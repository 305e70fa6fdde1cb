"""What the admin dashboard and ``alignforge annotate stats`` show: rates, agreement, alerts, plots.

    from alignforge.annotate.dashboard import project_stats
    with store.connect() as conn:
        s = project_stats(store, conn, cfg)
    s.rates[0].items_per_hour, s.agreement["trial"][0].alpha, s.alerts

Agreement is computed on the items several annotators judged (the shared part of each batch),
separately for trial items (the baseline set when the team was trained) and for the rest. An
alert is raised when an aspect's alpha on the non-trial items falls more than
``alert_margin`` below its trial baseline, or when an annotator's mean kappa against the others
does.
"""

from __future__ import annotations

import io
import math
import sqlite3
import statistics
from collections import defaultdict
from typing import NamedTuple

from alignforge.annotate.agreement import AspectAgreement, aspect_agreement, label
from alignforge.annotate.store import Judgement, Store


class RateRow(NamedTuple):
    user: str
    n_items: int
    items_per_hour: float  # 3600 * n / sum(min(server seconds, idle cap))
    median_server_seconds: float
    median_client_seconds: float
    last_at: float


class ProjectStats(NamedTuple):
    n_items: int
    n_released: int
    n_judgements: int
    rates: list[RateRow]
    agreement: dict[str, list[AspectAgreement]]  # 'trial' / 'main' -> per aspect (+ overall)
    annotator_kappa: dict[str, dict[str, float]]  # user -> {'trial': k, 'main': k}
    alerts: list[str]


def annotator_rates(judgements: list[Judgement], idle_cap: float) -> list[RateRow]:
    by: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        if j.role != "judge":
            by[j.user].append(j)
    rows = []
    for user, js in sorted(by.items()):
        server = [j.server_seconds for j in js if j.server_seconds is not None]
        client = [j.client_seconds for j in js if j.client_seconds is not None]
        busy = sum(min(s, idle_cap) for s in server)
        rate = 3600.0 * len(server) / busy if busy > 0 else math.nan
        rows.append(
            RateRow(
                user,
                len(js),
                rate,
                statistics.median(server) if server else math.nan,
                statistics.median(client) if client else math.nan,
                max(j.created_at for j in js),
            )
        )
    return rows


def item_labels(
    judgements: list[Judgement], aspect: str, item_ids: set[int] | None = None
) -> dict[int, dict[str, str]]:
    """``{item_id: {rater: 'a'|'tie'|'b' (or the 5-point value)}}`` for one aspect or 'overall'."""
    out: dict[int, dict[str, str]] = defaultdict(dict)
    for j in judgements:
        if item_ids is not None and j.item_id not in item_ids:
            continue
        if aspect == "overall":
            out[j.item_id][j.user] = label(j.overall)
        elif aspect in j.scores:
            out[j.item_id][j.user] = _cat(j.scores[aspect])
    return dict(out)


def _cat(score: int) -> str:
    return label(score) if abs(score) <= 1 else f"{'a' if score > 0 else 'b'}{abs(score)}"


def agreement_tables(
    judgements: list[Judgement], aspects: list[str], item_ids: set[int]
) -> list[AspectAgreement]:
    out = []
    for a in [*aspects, "overall"]:
        labels = item_labels(judgements, a, item_ids)
        out.append(aspect_agreement(labels, a, ties=True))
        out.append(aspect_agreement(labels, a, ties=False))
    return out


def annotator_kappa(judgements: list[Judgement], item_ids: set[int]) -> dict[str, float]:
    """Each annotator's mean pairwise kappa (overall preference, ties kept) against the others."""
    ag = aspect_agreement(item_labels(judgements, "overall", item_ids), "overall")
    acc: dict[str, list[float]] = defaultdict(list)
    for p in ag.pairs:
        if not math.isnan(p.kappa):
            acc[p.rater1].append(p.kappa)
            acc[p.rater2].append(p.kappa)
    return {u: sum(v) / len(v) for u, v in acc.items()}


def project_stats(store: Store, conn: sqlite3.Connection, aspects: list[str], margin: float,
                  idle_cap: float = 600.0) -> ProjectStats:  # fmt: skip
    n_items, n_rel = conn.execute("SELECT COUNT(*), COUNT(batch_id) FROM items").fetchone()
    trial_ids = {r[0] for r in conn.execute("SELECT id FROM items WHERE trial=1")}
    main_ids = {r[0] for r in conn.execute("SELECT id FROM items WHERE trial=0")}
    every = store.judgements(conn)
    humans = [j for j in every if j.role != "judge"]
    agreement = {
        "trial": agreement_tables(humans, aspects, trial_ids),
        "main": agreement_tables(humans, aspects, main_ids),
    }
    kt, km = annotator_kappa(humans, trial_ids), annotator_kappa(humans, main_ids)
    per_user = {u: {"trial": kt.get(u, math.nan), "main": km.get(u, math.nan)} for u in {*kt, *km}}
    alerts = []
    for base, cur in zip(agreement["trial"], agreement["main"], strict=True):
        if (
            not (math.isnan(base.alpha) or math.isnan(cur.alpha))
            and cur.alpha < base.alpha - margin
        ):
            t = "with ties" if base.ties else "without ties"
            alerts.append(
                f"agreement on '{base.aspect}' ({t}) fell to alpha={cur.alpha:.2f} from the trial "
                f"baseline {base.alpha:.2f}: stop and review the brief with the team"
            )
    for u, k in sorted(per_user.items()):
        if (
            not (math.isnan(k["trial"]) or math.isnan(k["main"]))
            and k["main"] < k["trial"] - margin
        ):
            alerts.append(
                f"annotator {u}: mean kappa {k['main']:.2f} is below their trial baseline "
                f"{k['trial']:.2f}"
            )
    return ProjectStats(n_items, n_rel, len(every), annotator_rates(every, idle_cap), agreement,
                        per_user, alerts)  # fmt: skip


# ------------------------------------------------------------------------------ plots
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fig(w: float = 7, h: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def plot_rate(judgements: list[Judgement]) -> bytes:
    """Judgements per hour over time, one line per annotator."""
    fig, ax = _fig()
    humans = [j for j in judgements if j.role != "judge"]
    if humans:
        t0 = min(j.created_at for j in humans)
        by: dict[str, list[float]] = defaultdict(list)
        for j in humans:
            by[j.user].append((j.created_at - t0) / 3600.0)
        for user, hours in sorted(by.items()):
            hours.sort()
            ax.step(hours, range(1, len(hours) + 1), where="post", label=user)
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("hours since the first judgement")
    ax.set_ylabel("items judged")
    ax.set_title("Annotation progress (slope = items per hour)")
    return _png(fig)


def plot_time(judgements: list[Judgement], idle_cap: float) -> bytes:
    """Seconds spent per item (server-side, capped), box per annotator."""
    fig, ax = _fig()
    by: dict[str, list[float]] = defaultdict(list)
    for j in judgements:
        if j.role != "judge" and j.server_seconds is not None:
            by[j.user].append(min(j.server_seconds, idle_cap))
    if by:
        names = sorted(by)
        ax.boxplot([by[n] for n in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=8)
    ax.set_ylabel("seconds per item")
    ax.set_title("Time per item")
    return _png(fig)


def plot_agreement(stats: ProjectStats) -> bytes:
    """Krippendorff's alpha per aspect: trial baseline vs the rest, with and without ties."""
    import numpy as np

    fig, ax = _fig()
    rows = [(t, m) for t, m in zip(stats.agreement["trial"], stats.agreement["main"], strict=True)]
    x = np.arange(len(rows))
    names = [f"{t.aspect}{'' if t.ties else ' (no ties)'}" for t, _ in rows]
    ax.bar(x - 0.2, [_z(t.alpha) for t, _ in rows], 0.4, label="trial baseline")
    ax.bar(x + 0.2, [_z(m.alpha) for _, m in rows], 0.4, label="since")
    ax.set_xticks(x, names, rotation=30, fontsize=8, ha="right")
    ax.axhline(0.667, ls=":", c="grey", lw=1)
    ax.set_ylabel("Krippendorff's alpha")
    ax.set_ylim(min(-0.1, *[_z(t.alpha) for t, _ in rows], 0), 1.0)
    ax.legend(fontsize=8)
    ax.set_title("Inter-annotator agreement")
    return _png(fig)


def _z(v: float) -> float:
    return 0.0 if math.isnan(v) else v
