"""What the admin dashboard and ``alignforge annotate stats`` show: rates, agreement, alerts, plots.

    from alignforge.annotate.dashboard import AlertRules, project_stats
    with store.connect() as conn:
        s = project_stats(store, conn, ["entities"], "nominal", AlertRules(0.4, 0.1, 20))
    s.windows[0].rows[0].alpha, s.alerts, s.annotators[0].majority_agreement

Agreement is computed on the items two or more annotators judged (the shared part of each
batch), in *windows*: the trial items (the baseline set when the team was trained), every item
since, each later batch, and each day (UTC, by the item's last judgement). A lead acts on a
window, not on a cumulative figure: 40 items of noise after 200 good ones hardly move the
cumulative alpha, but their batch's alpha is near 0.

Alert rules, for every window with at least ``min_items`` shared items (smaller windows get a
note instead: two items say nothing):

* alpha on an aspect below the absolute ``floor``: raised with or without a trial batch;
* alpha more than ``margin`` below the trial baseline, when the trial has ``min_items`` too;
  the window's whole 95% interval must be below baseline - margin, because two estimates on a
  few dozen items differ by 0.1 by chance alone;
* an annotator's mean kappa more than ``margin`` below both their trial kappa and the other
  annotators' current median.

Alpha is reported with a 95% bootstrap interval over the window's items.

The figures are computed on people's judgements. Simulated annotators (``annotate/panel.py``)
get the same figures computed on theirs alone (``raters="simulated"``), labelled: their alerts
and notes start with "simulated annotators:", so a panel's noise never moves a team's alpha.
"""

from __future__ import annotations

import io
import math
import sqlite3
import statistics
import time
from collections import Counter, defaultdict
from typing import NamedTuple

import numpy as np

from alignforge.annotate.agreement import (
    AspectAgreement,
    Ratings,
    aspect_agreement,
    bootstrap_weights,
    to_ratings,
)
from alignforge.annotate.store import Judgement, Store


class AlertRules(NamedTuple):
    floor: float  # alert when a window's alpha is below this, baseline or not
    margin: float  # alert when alpha < trial baseline - margin
    min_items: int  # windows with fewer shared items raise no alert, only a note


class ItemInfo(NamedTuple):
    batch: str
    trial: bool


class Window(NamedTuple):
    kind: str  # 'trial' | 'main' | 'batch' | 'day'
    name: str  # batch name or ISO date; '' for trial and main
    n_items: int  # items with two or more raters
    rows: list[AspectAgreement]  # per aspect and 'overall', with and without ties

    @property
    def title(self) -> str:
        return {"trial": "trial items", "main": "every item since the trial",
                "batch": f"batch {self.name}", "day": f"day {self.name}"}[self.kind]  # fmt: skip


class AnnotatorRow(NamedTuple):
    user: str
    n_items: int
    items_per_hour: float  # 3600 * n / sum(min(server seconds, idle cap))
    median_server_seconds: float
    median_client_seconds: float
    last_at: float
    skips: int
    comments: int
    majority_agreement: float  # share of their items on the side the other raters' majority took
    n_majority_items: int
    kappa_trial: float  # mean pairwise kappa (overall direction) against the others
    kappa_main: float


class ProjectStats(NamedTuple):
    n_items: int
    n_released: int
    n_judgements: int
    windows: list[Window]
    annotators: list[AnnotatorRow]
    alerts: list[str]
    notes: list[str]
    raters: str = "humans"  # whose judgements the figures are computed on: humans | simulated
    n_simulated: int = 0  # judgements by simulated annotators in the project


RATERS = ("humans", "simulated")


def humans(judgements: list[Judgement]) -> list[Judgement]:
    """Annotators' judgements (admins count only when marked as annotating)."""
    return [j for j in judgements if j.role == "annotator"]


def rated_by(judgements: list[Judgement], raters: str) -> list[Judgement]:
    """People's judgements (``humans``), or the simulated annotators' (``simulated``)."""
    if raters not in RATERS:
        raise ValueError(f"raters must be one of {', '.join(RATERS)}, got {raters!r}")
    return (
        humans(judgements)
        if raters == "humans"
        else [j for j in judgements if j.role == "simulated"]
    )


def item_scores(judgements: list[Judgement], aspect: str) -> dict[int, dict[str, int]]:
    """``{item_id: {rater: canonical score}}`` for one aspect, or the sign of the sum ('overall')."""
    out: dict[int, dict[str, int]] = defaultdict(dict)
    for j in judgements:
        if aspect == "overall":
            out[j.item_id][j.user] = (j.overall > 0) - (j.overall < 0)
        elif aspect in j.scores:
            out[j.item_id][j.user] = int(j.scores[aspect])
    return dict(out)


def window_agreement(
    ratings: dict[str, Ratings], item_ids: set[int], level: str, n_boot: int, seed: int
) -> tuple[int, list[AspectAgreement]]:
    """Agreement on ``item_ids`` for every aspect in ``ratings`` (aspect -> ``Ratings``).

    Only items with two or more raters count. All aspects share one resampling of the items,
    so their intervals are comparable.
    """
    overall = ratings["overall"]
    ids, n_raters = np.unique(overall.unit[np.isin(overall.unit, list(item_ids))],
                              return_counts=True)  # fmt: skip
    order = ids[n_raters >= 2].tolist()
    w = bootstrap_weights(len(order), n_boot, seed) if n_boot else None
    rows = []
    for aspect, rt in ratings.items():
        lvl = "nominal" if aspect == "overall" else level
        for ties in (True, False):
            rows.append(aspect_agreement(rt, aspect, ties, lvl, w, order))
    return len(order), rows


def agreement_windows(
    judgements: list[Judgement], items: dict[int, ItemInfo], aspects: list[str], level: str,
    n_boot: int = 1000, seed: int = 0,
) -> list[Window]:  # fmt: skip
    scores = {a: item_scores(judgements, a) for a in [*aspects, "overall"]}
    ratings = {a: to_ratings(sc) for a, sc in scores.items()}
    last: dict[int, float] = defaultdict(float)
    for j in judgements:
        last[j.item_id] = max(last[j.item_id], j.created_at)
    known = [i for i in scores["overall"] if i in items]
    trial = {i for i in known if items[i].trial}
    main = set(known) - trial
    groups = [("trial", "", trial), ("main", "", main)]
    batches = sorted({items[i].batch for i in main})
    if len(batches) > 1:
        groups += [("batch", b, {i for i in main if items[i].batch == b}) for b in batches]
    days = sorted({_day(last[i]) for i in main})
    if len(days) > 1:
        groups += [("day", d, {i for i in main if _day(last[i]) == d}) for d in days]
    out = []
    for k, (kind, name, ids) in enumerate(groups):
        n, rows = window_agreement(ratings, ids, level, n_boot, seed + k)
        out.append(Window(kind, name, n, rows))
    return out


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def agreement_alerts(windows: list[Window], rules: AlertRules) -> tuple[list[str], list[str]]:
    """(alerts, notes) for the windows; see the module docstring for the rules."""
    alerts, notes = [], []
    base = next((w for w in windows if w.kind == "trial" and w.n_items >= rules.min_items), None)
    base_alpha = {r.aspect: r.alpha for r in base.rows if r.ties} if base else {}
    for w in windows:
        if w.n_items == 0:
            continue
        if w.n_items < rules.min_items:
            notes.append(f"{w.title}: {w.n_items} items judged by two or more annotators; "
                         f"agreement alerts need {rules.min_items}")  # fmt: skip
            continue
        rows = [r for r in w.rows if r.ties and not math.isnan(r.alpha)]
        low = [r for r in rows if r.alpha < rules.floor]
        if low:
            alerts.append(f"{w.title}: alpha below the floor {rules.floor:.2f} on "
                          f"{_list(low)}: stop and review the brief with the team")  # fmt: skip
        if w.kind != "trial" and base_alpha:
            fell = [r for r in rows if r not in low
                    and _upper(r) < base_alpha.get(r.aspect, math.nan) - rules.margin]  # fmt: skip
            if fell:
                alerts.append(
                    f"{w.title}: alpha fell more than {rules.margin:.2f} below the trial "
                    f"baseline on {_list(fell, base_alpha)}: review the brief with the team"
                )
    return alerts, notes


def _upper(r: AspectAgreement) -> float:
    """The interval's upper end: two noisy estimates differ by chance, a drop must exceed that."""
    return r.alpha if math.isnan(r.alpha_hi) else r.alpha_hi


def _list(rows: list[AspectAgreement], base: dict[str, float] | None = None) -> str:
    def one(r: AspectAgreement) -> str:
        ci = "" if math.isnan(r.alpha_lo) else f" [{r.alpha_lo:.2f}, {r.alpha_hi:.2f}]"
        b = f", trial {base[r.aspect]:.2f}" if base else ""
        return f"'{r.aspect}' {r.alpha:.2f}{ci} (n={r.n_items}{b})"

    return "; ".join(one(r) for r in rows)


def majority_agreement(judgements: list[Judgement]) -> dict[str, tuple[float, int]]:
    """user -> (share of their items where their overall direction matches the strict plurality
    of the *other* raters, number of such items); items need two or more other raters."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for raters in item_scores(judgements, "overall").values():
        everyone = Counter(raters.values())
        for user, mine in raters.items():
            others = everyone.copy()
            others[mine] -= 1
            ranked = sorted(others.values(), reverse=True)
            if sum(ranked) < 2 or (len(ranked) > 1 and ranked[0] == ranked[1]):
                continue  # too few others, or they are split: no majority to agree with
            hits[user].append(others[mine] == ranked[0])
    return {u: (sum(h) / len(h), len(h)) for u, h in hits.items()}


def annotator_kappa(
    judgements: list[Judgement], item_ids: set[int], min_items: int
) -> dict[str, float]:
    """Each annotator's mean pairwise kappa (overall direction, ties kept) against the others."""
    scores = {i: r for i, r in item_scores(judgements, "overall").items() if i in item_ids}
    ag = aspect_agreement(scores, "overall", min_pair_items=min_items)
    acc: dict[str, list[float]] = defaultdict(list)
    for p in ag.pairs:
        if not math.isnan(p.kappa):
            acc[p.rater1].append(p.kappa)
            acc[p.rater2].append(p.kappa)
    return {u: sum(v) / len(v) for u, v in acc.items()}


def annotator_rows(
    judgements: list[Judgement], items: dict[int, ItemInfo], skips: dict[str, int],
    idle_cap: float, min_items: int,
) -> list[AnnotatorRow]:  # fmt: skip
    by: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        by[j.user].append(j)
    trial = {i for i, it in items.items() if it.trial}
    kt = annotator_kappa(judgements, trial, min_items)
    km = annotator_kappa(judgements, set(items) - trial, min_items)
    maj = majority_agreement(judgements)
    rows = []
    for user in sorted(set(by) | set(skips)):
        js = by.get(user, [])
        server = [j.server_seconds for j in js if j.server_seconds is not None]
        client = [j.client_seconds for j in js if j.client_seconds is not None]
        busy = sum(min(x, idle_cap) for x in server)
        m, n_m = maj.get(user, (math.nan, 0))
        rows.append(AnnotatorRow(
            user, len(js), 3600.0 * len(server) / busy if busy > 0 else math.nan,
            statistics.median(server) if server else math.nan,
            statistics.median(client) if client else math.nan,
            max((j.created_at for j in js), default=math.nan), skips.get(user, 0),
            sum(bool(j.comment) for j in js), m, n_m, kt.get(user, math.nan),
            km.get(user, math.nan),
        ))  # fmt: skip
    return rows


def annotator_alerts(rows: list[AnnotatorRow], margin: float) -> list[str]:
    """An annotator whose kappa fell more than ``margin`` below their trial kappa *and* below the
    other annotators' median: a drop of the whole team is a window alert, not theirs."""
    out = []
    for r in rows:
        others = [o.kappa_main for o in rows if o.user != r.user and not math.isnan(o.kappa_main)]
        if math.isnan(r.kappa_trial) or math.isnan(r.kappa_main) or not others:
            continue
        median = statistics.median(others)
        if r.kappa_main < r.kappa_trial - margin and r.kappa_main < median - margin:
            out.append(f"annotator {r.user}: mean kappa {r.kappa_main:.2f} is more than "
                       f"{margin:.2f} below their trial baseline {r.kappa_trial:.2f} and the "
                       f"others' median {median:.2f}")  # fmt: skip
    return out


class Disagreement(NamedTuple):
    item_id: int
    batch: str
    n_raters: int
    counts: dict[str, int]  # overall direction: 'a' / 'tie' / 'b' -> raters
    majority_share: float  # share of raters on the largest side
    split_aspects: list[str]  # aspects on which the raters' directions differ
    adjudicated: bool


def disagreements(
    judgements: list[Judgement], items: dict[int, ItemInfo], aspects: list[str],
    decided: set[int],
) -> list[Disagreement]:  # fmt: skip
    """Items whose raters differ on the overall direction: the adjudication queue, undecided
    first, then the most split (smallest majority), then the most raters."""
    overall = item_scores(judgements, "overall")
    per_aspect = {a: item_scores(judgements, a) for a in aspects}
    out = []
    for item, raters in overall.items():
        dirs = Counter({1: "a", 0: "tie", -1: "b"}[v] for v in raters.values())
        if len(raters) < 2 or len(dirs) < 2:
            continue
        split = [a for a in aspects
                 if len({(v > 0) - (v < 0) for v in per_aspect[a].get(item, {}).values()}) > 1]  # fmt: skip
        info = items.get(item, ItemInfo("", False))
        out.append(Disagreement(item, info.batch, len(raters), dict(dirs),
                                max(dirs.values()) / len(raters), split, item in decided))  # fmt: skip
    return sorted(out, key=lambda d: (d.adjudicated, d.majority_share, -d.n_raters, d.item_id))


def compute_stats(
    judgements: list[Judgement], items: dict[int, ItemInfo], skips: dict[str, int],
    aspects: list[str], level: str, rules: AlertRules, idle_cap: float = 600.0,
    n_boot: int = 1000,
) -> tuple[list[Window], list[AnnotatorRow], list[str], list[str]]:  # fmt: skip
    """(windows, annotator rows, alerts, notes) from the human judgements given."""
    windows = agreement_windows(judgements, items, aspects, level, n_boot)
    rows = annotator_rows(judgements, items, skips, idle_cap, rules.min_items)
    alerts, notes = agreement_alerts(windows, rules)
    return windows, rows, alerts + annotator_alerts(rows, rules.margin), notes


def item_infos(conn: sqlite3.Connection) -> dict[int, ItemInfo]:
    """Batch and trial flag of every released item."""
    return {
        r[0]: ItemInfo(r[1], bool(r[2]))
        for r in conn.execute(
            "SELECT i.id, b.name, i.trial FROM items i JOIN batches b ON b.id = i.batch_id"
        )
    }


def project_stats(
    store: Store, conn: sqlite3.Connection, aspects: list[str], level: str, rules: AlertRules,
    idle_cap: float = 600.0, n_boot: int = 1000, raters: str = "humans",
) -> ProjectStats:  # fmt: skip
    n_items, n_rel = conn.execute("SELECT COUNT(*), COUNT(batch_id) FROM items").fetchone()
    items = item_infos(conn)
    skips = dict(conn.execute(
        "SELECT u.name, COUNT(*) FROM assignments a JOIN users u ON u.id = a.user_id "
        "WHERE a.status = 'skipped' AND u.simulated = ? GROUP BY u.name",
        (int(raters == "simulated"),),
    ).fetchall())  # fmt: skip
    every = store.judgements(conn)
    mine = rated_by(every, raters)
    windows, rows, alerts, notes = compute_stats(mine, items, skips, aspects, level, rules,
                                                 idle_cap, n_boot)  # fmt: skip
    if raters == "simulated":
        alerts = [f"simulated annotators: {a}" for a in alerts]
        notes = [f"simulated annotators: {n}" for n in notes]
    n_sim = sum(j.role == "simulated" for j in every)
    return ProjectStats(n_items, n_rel, len(every), windows, rows, alerts, notes, raters, n_sim)


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


def plot_rate(judgements: list[Judgement], raters: str = "humans") -> bytes:
    """Judgements per hour over time, one line per annotator."""
    fig, ax = _fig()
    people = rated_by(judgements, raters)
    if people:
        t0 = min(j.created_at for j in people)
        by: dict[str, list[float]] = defaultdict(list)
        for j in people:
            by[j.user].append((j.created_at - t0) / 3600.0)
        for user, hours in sorted(by.items()):
            hours.sort()
            ax.step(hours, range(1, len(hours) + 1), where="post", label=user)
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("hours since the first judgement")
    ax.set_ylabel("items judged")
    ax.set_title("Annotation progress (slope = items per hour)")
    return _png(fig)


def plot_time(judgements: list[Judgement], idle_cap: float, raters: str = "humans") -> bytes:
    """Seconds spent per item (server-side, capped), box per annotator."""
    fig, ax = _fig()
    by: dict[str, list[float]] = defaultdict(list)
    for j in rated_by(judgements, raters):
        if j.server_seconds is not None:
            by[j.user].append(min(j.server_seconds, idle_cap))
    if by:
        names = sorted(by)
        ax.boxplot([by[n] for n in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, fontsize=8)
    ax.set_ylabel("seconds per item")
    ax.set_title("Time per item")
    return _png(fig)


def plot_agreement(stats: ProjectStats, floor: float) -> bytes:
    """Krippendorff's alpha per window and aspect (ties kept) with 95% bootstrap intervals."""
    fig, ax = _fig(8, 3.4)
    windows = [w for w in stats.windows if w.n_items]
    aspects = [r.aspect for r in windows[0].rows if r.ties] if windows else []
    x = np.arange(len(windows))
    width = 0.8 / max(1, len(aspects))
    for k, aspect in enumerate(aspects):
        rows = [next(r for r in w.rows if r.ties and r.aspect == aspect) for w in windows]
        y = np.array([_z(r.alpha) for r in rows])
        err = np.array([[max(0.0, _z(r.alpha) - _z(r.alpha_lo, r.alpha)),
                         max(0.0, _z(r.alpha_hi, r.alpha) - _z(r.alpha))] for r in rows]).T  # fmt: skip
        ax.bar(x - 0.4 + (k + 0.5) * width, y, width, yerr=err, capsize=2, label=aspect)
    ax.set_xticks(x, [f"{w.title}\n(n={w.n_items})" for w in windows], fontsize=7)
    ax.axhline(floor, ls=":", c="#cf222e", lw=1, label=f"floor {floor:.2f}")
    ax.set_ylabel("Krippendorff's alpha")
    ax.set_ylim(min([-0.2, *[_z(r.alpha_lo) for w in windows for r in w.rows]]), 1.0)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Agreement per window (95% bootstrap intervals)")
    return _png(fig)


def _z(v: float, default: float = 0.0) -> float:
    return default if math.isnan(v) else v
