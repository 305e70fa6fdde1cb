"""Alert rules on simulated teams: the three situations a lead must not miss or be flooded by."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignforge.annotate.dashboard import AlertRules, ItemInfo, compute_stats, majority_agreement
from alignforge.annotate.store import Judgement

ASPECTS = ["entities", "relations", "summary"]
RULES = AlertRules(floor=0.4, margin=0.1, min_items=20)
DAY = 86_400.0


class Team:
    """Judgements of ``n_raters`` on shared items; each rater gives the item's true side on
    every aspect with probability ``p_right``, else a uniformly random answer."""

    def __init__(self, n_raters: int = 5, seed: int = 0):
        self.raters = [f"r{k}" for k in range(n_raters)]
        self.rng = np.random.default_rng(seed)
        self.judgements: list[Judgement] = []
        self.items: dict[int, ItemInfo] = {}

    def batch(self, name: str, n: int, p_right: float, trial: bool = False, t0: float = 0.0):
        for _ in range(n):
            item = len(self.items) + 1
            self.items[item] = ItemInfo(name, trial)
            truth = int(self.rng.choice([-1, 1]))
            for r in self.raters:
                scores = {
                    a: truth if self.rng.random() < p_right else int(self.rng.integers(-1, 2))
                    for a in ASPECTS
                }
                jid = len(self.judgements) + 1
                self.judgements.append(Judgement(jid, 0, r, "annotator", item, scores,
                                                 float(sum(scores.values())), 30.0, 20.0,
                                                 t0 + jid))  # fmt: skip
        return self

    def stats(self, rules: AlertRules = RULES):
        return compute_stats(self.judgements, self.items, {}, ASPECTS, "nominal", rules,
                             n_boot=300)  # fmt: skip


def test_random_answers_without_a_trial_batch_raise_an_alert():
    windows, _, alerts, notes = Team().batch("b1", 60, p_right=0.0).stats()
    main = next(w for w in windows if w.kind == "main")
    alpha = next(r for r in main.rows if r.aspect == "entities" and r.ties)
    assert abs(alpha.alpha) < 0.15 and alpha.alpha_lo < alpha.alpha < alpha.alpha_hi
    assert len(alerts) == 1 and "every item since the trial: alpha below the floor" in alerts[0]
    for aspect in [*ASPECTS, "overall"]:
        assert f"'{aspect}'" in alerts[0]
    assert not notes


def test_a_noisy_batch_after_good_ones_raises_an_alert_naming_that_batch():
    team = Team().batch("b1", 200, p_right=0.85).batch("b2", 40, p_right=0.0, t0=DAY)
    windows, _, alerts, _ = team.stats()
    by = {(w.kind, w.name): w for w in windows}
    cumulative = next(r for r in by[("main", "")].rows if r.aspect == "entities" and r.ties)
    assert cumulative.alpha > RULES.floor  # the cumulative figure hides the noise
    assert by[("batch", "b2")].n_items == 40
    assert any(a.startswith("batch b2: alpha below the floor") for a in alerts), alerts
    assert any(a.startswith("day 1970-01-02: alpha below the floor") for a in alerts), alerts
    assert not any("batch b1" in a or "every item since" in a for a in alerts), alerts


def test_a_tiny_batch_raises_no_alert_only_a_note():
    team = Team().batch("b1", 200, p_right=0.85).batch("b2", 2, p_right=0.0)
    _, _, alerts, notes = team.stats()
    assert alerts == []
    assert notes == ["batch b2: 2 items judged by two or more annotators; agreement alerts "
                     "need 20"]  # fmt: skip


def test_a_drop_below_the_trial_baseline_alerts_even_above_the_floor():
    team = Team(seed=1).batch("trial", 40, p_right=1.0, trial=True)
    team.batch("b1", 60, p_right=0.8)
    windows, _, alerts, _ = team.stats()
    main = next(r for r in windows[1].rows if r.aspect == "entities" and r.ties)
    assert RULES.floor < main.alpha < 0.9
    assert any("fell more than 0.10 below the trial baseline" in a for a in alerts), alerts
    # a team as good as in its trial raises nothing, though its point estimates differ by chance
    calm = Team(seed=1).batch("trial", 40, p_right=0.85, trial=True)
    windows, _, alerts, _ = calm.batch("b1", 60, p_right=0.85).stats()
    trial, since = ({r.aspect: r.alpha for r in w.rows if r.ties} for w in windows[:2])
    assert max(trial[a] - since[a] for a in ASPECTS) > RULES.margin
    assert alerts == []


def test_annotator_rows_majority_kappa_and_a_drifting_annotator():
    team = Team(n_raters=4, seed=3).batch("trial", 30, p_right=1.0, trial=True)
    team.batch("b1", 30, p_right=1.0)
    for k, j in enumerate(team.judgements):  # after the trial r3 answers the opposite side
        if j.user == "r3" and not team.items[j.item_id].trial:
            flipped = {a: -v for a, v in j.scores.items()}
            team.judgements[k] = j._replace(overall=-j.overall, scores=flipped)
    maj = majority_agreement(team.judgements)
    assert maj["r0"] == (1.0, 60) and maj["r3"] == (0.5, 60)
    _, rows, alerts, _ = team.stats()
    by = {r.user: r for r in rows}
    assert by["r3"].kappa_main < 0 < by["r0"].kappa_main
    assert by["r0"].kappa_trial == pytest.approx(1.0)
    assert by["r0"].items_per_hour == pytest.approx(120.0)  # 30 s per item
    assert [a for a in alerts if a.startswith("annotator")] == [
        a for a in alerts if a.startswith("annotator r3:")] != []  # fmt: skip
    assert not math.isnan(by["r3"].kappa_trial)


def test_the_five_point_scale_is_ordinal_on_the_dashboard(tmp_path):
    """Raters who agree on the direction but not on 'much' get ordinal alpha from the project,
    equal to the krippendorff package's; the overall direction stays nominal."""
    kd = pytest.importorskip("krippendorff")
    from fastapi.testclient import TestClient

    from alignforge.annotate.config import AnnotateConfig
    from alignforge.annotate.server import create_app
    from tests.annotate.helpers import login, make_project

    cfg = AnnotateConfig(scale="likert5", min_agreement_items=2, bootstrap_samples=0)
    store, tokens = make_project(tmp_path / "p", overlap=1.0, cfg=cfg)
    ratings: dict[str, list[tuple[int, int]]] = {"alice": [], "bob": []}
    with store.connect() as conn:
        for name in ratings:
            user = store.user_by_token(conn, tokens[name])
            while (served := store.next_item(conn, user)) is not None:
                item = served.item_id
                much = (item % 3 == 0) == (name == "alice")  # they differ on 'much' only
                score = (1 if item % 2 else -1) * (2 if much else 1)  # canonical
                shown = -score if served.swapped else score
                store.submit(conn, user, item, f"{name}-{item:06d}",
                             {a: shown for a in ("entities", "relations", "summary")})  # fmt: skip
        for j in store.judgements(conn):
            if j.user in ratings:
                ratings[j.user].append((j.item_id, j.scores["entities"]))
    admin = TestClient(create_app(store.dir))
    login(admin, tokens["admin"])
    main = next(w for w in admin.get("/admin/api/stats").json()["windows"] if w["kind"] == "main")
    row = next(r for r in main["rows"] if r["aspect"] == "entities" and r["ties"])
    overall = next(r for r in main["rows"] if r["aspect"] == "overall" and r["ties"])
    assert row["level"] == "ordinal" and overall["level"] == "nominal"
    ids = sorted({i for v in ratings.values() for i, _ in v})
    data = [[dict(ratings[n]).get(i, np.nan) for i in ids] for n in ("alice", "bob")]
    want = kd.alpha(reliability_data=data, level_of_measurement="ordinal")
    assert row["alpha"] == pytest.approx(want, abs=1e-12) and row["alpha"] > 0.5
    assert overall["alpha"] == pytest.approx(1.0)
