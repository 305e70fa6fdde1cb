"""Simulated annotators: their noise shows up in the store as configured (agreement, position
bias, fatigue), and everything they produce is marked simulated in the store, exports, the
dashboard and the CLI, while going through the same queue as people."""

from __future__ import annotations

import json
import math
import random
import re
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alignforge.annotate.agreement import majority_accuracy, rater_accuracy
from alignforge.annotate.cli import app
from alignforge.annotate.config import AnnotateConfig, Noise, PanelConfig
from alignforge.annotate.dashboard import project_stats
from alignforge.annotate.export import build_records, label_accuracy
from alignforge.annotate.panel import flip_probability, panel_ceiling, run_panel, simulated_answer
from alignforge.annotate.reference import ReferenceJudge
from alignforge.annotate.store import Store, StoreError
from tests.annotate.helpers import DOCS, _caps, login, make_project, sample_rows, write_jsonl

ENTITIES = {"entities": "Which has more complete and accurate entities?"}


def gold_project(root, n: int, overlap: float | None = None):
    """``n`` items on which a finds all four gold entities and b two: the reference says a
    (+1) on entities every time. All items shared (trial batch) unless ``overlap`` is given."""
    items, refs = [], {}
    for i in range(n):
        ents = [{"name": f"Firm {i} {k}", "type": "ORG"} for k in range(4)]
        refs[f"p{i}"] = {"entities": ents}
        items.append({"pair_key": f"p{i}", "prompt_id": f"p{i}", "prompt": f"Document {i}",
                      "a_text": json.dumps({"entities": ents}),
                      "b_text": json.dumps({"entities": ents[:2]})})  # fmt: skip
    store = Store.create(root)
    store.insert_items(items)
    if overlap is None:
        store.release("trial", None, trial=True)
    else:
        store.release("b1", None, overlap=overlap)
    return store, ReferenceJudge(refs, {"entities": "entity_f1"})


def by_user(store) -> dict[str, list]:
    """Each simulated annotator's judgements in the order they made them."""
    out: dict[str, list] = {}
    with store.connect() as conn:
        for j in store.judgements(conn):
            out.setdefault(j.user, []).append(j)
    return out


def test_the_noise_rules_by_hand():
    rng = random.Random(0)
    truth = {"e": 1, "r": -2, "s": 0}
    assert simulated_answer(truth, Noise(flip_rate=0, tie_rate=0, position_bias=0), 0, rng) == truth
    flip = Noise(flip_rate=1, tie_rate=0, position_bias=0)
    assert simulated_answer(truth, flip, 0, rng) == {"e": -1, "r": 2, "s": 0}  # ties stay ties
    tie = Noise(flip_rate=1, tie_rate=1, position_bias=0)
    assert simulated_answer(truth, tie, 0, rng) == {"e": 0, "r": 0, "s": 0}
    first = Noise(flip_rate=1, tie_rate=1, position_bias=1)  # the side shown first, always
    assert simulated_answer(truth, first, 0, rng) == {"e": 1, "r": 2, "s": 1}
    # fatigue adds to the flip rate per 100 items and stops adding at 1/2
    tired = Noise(flip_rate=0.1, fatigue=0.2)
    assert flip_probability(tired, 0) == pytest.approx(0.1)
    assert flip_probability(tired, 100) == pytest.approx(0.3)
    assert flip_probability(tired, 1000) == 0.5
    assert flip_probability(Noise(flip_rate=0.7, fatigue=0.2), 1000) == 0.7


def test_two_annotators_agree_as_their_flip_rate_implies(tmp_path):
    """Flip rate p = 0.2, no other noise, 300 decisive items both judge: they agree on
    A = (1 - p)² + p² = 0.68 of them. Tolerance: 3 binomial standard errors,
    3·√(0.68·0.32/300) = 0.081. The agreement implies each rater is right with
    q = (1 + √(2A − 1))/2 = 0.8 = 1 - p, which the exports turn into the RM's ceiling."""
    store, judge = gold_project(tmp_path / "p", 300)
    panel = PanelConfig(annotators=2, flip_rate=0.2, tie_rate=0, position_bias=0, seed=3)
    run = run_panel(store, judge, panel, ENTITIES)
    assert run.judged == {"sim-1": 300, "sim-2": 300} and run.skipped == 0
    js = by_user(store)
    agree = sum(
        a.scores["entities"] == b.scores["entities"]
        for a, b in zip(sorted(js["sim-1"], key=lambda j: j.item_id),
                        sorted(js["sim-2"], key=lambda j: j.item_id), strict=True)
    ) / 300  # fmt: skip
    assert abs(agree - 0.68) < 3 * math.sqrt(0.68 * 0.32 / 300)
    for name in ("sim-1", "sim-2"):  # each one's agreement with the reference: 1 - p
        assert abs(run.accuracy[name] - 0.8) < 3 * math.sqrt(0.8 * 0.2 / 300)
    c = panel_ceiling(store)
    assert c.n_pairs == 300 and c.agreement == pytest.approx(agree)
    assert c.rater_accuracy == pytest.approx(rater_accuracy(agree))
    assert abs(c.rater_accuracy - 0.8) < 0.06
    # exported: a label from two agreeing raters is right with q²/(q² + (1-q)²); splits tie
    records, rep = build_records(store, annotators="simulated")
    assert len(records) == round(agree * 300)  # a 1-1 split averages to a tie, dropped
    assert all(r["simulated"] and r["n_annotators"] == 2 for r in records)
    want = majority_accuracy(c.rater_accuracy, 2)
    assert {round(r["agreement_ceiling"], 9) for r in records} == {round(want, 9)}
    assert rep.agreement_ceiling == pytest.approx(want)
    assert build_records(store)[0] == []  # nothing from people


def test_position_bias_shows_as_a_first_shown_preference_rate(tmp_path):
    """Sides are random per annotator, so without bias the side shown first is the better one
    half the time. With bias b = 0.4 (and no other noise) the first-shown side is preferred on
    b + (1 - b)/2 = 0.7 of the items; sim-2 (no bias) stays at 1/2. 3 standard errors each."""
    store, judge = gold_project(tmp_path / "p", 300)
    panel = PanelConfig(annotators=2, flip_rate=0, tie_rate=0, position_bias=0.4,
                        members=[{}, {"position_bias": 0.0}])  # fmt: skip
    run_panel(store, judge, panel, ENTITIES)
    with store.connect() as conn:
        rate = {}
        for name in ("sim-1", "sim-2"):
            user = store.simulated_user(conn, name)
            shown = store.history(conn, user.id, limit=1000)
            rate[name] = sum(h["display_scores"]["entities"] > 0 for h in shown) / len(shown)
    assert abs(rate["sim-1"] - 0.7) < 3 * math.sqrt(0.7 * 0.3 / 300)
    assert abs(rate["sim-2"] - 0.5) < 3 * math.sqrt(0.5 * 0.5 / 300)


def test_fatigue_raises_disagreement_late_in_the_session(tmp_path):
    """Fatigue 0.15 per 100 items from flip rate 0: the flip rate climbs from 0 to 0.45 over
    300 items, so sim-1 departs from the reference on about 7.5% of its first 100 items and
    37.5% of its last 100. sim-2 has no fatigue and never departs."""
    store, judge = gold_project(tmp_path / "p", 300)
    panel = PanelConfig(annotators=2, flip_rate=0, tie_rate=0, position_bias=0, fatigue=0.15,
                        members=[{}, {"fatigue": 0.0}])  # fmt: skip
    run_panel(store, judge, panel, ENTITIES)
    js = by_user(store)
    wrong = [j.scores["entities"] != 1 for j in js["sim-1"]]
    early, late = sum(wrong[:100]) / 100, sum(wrong[-100:]) / 100
    assert early < 0.15 and late > 0.25 and late - early > 0.15
    assert not any(j.scores["entities"] != 1 for j in js["sim-2"])


def test_a_panel_run_repeats_exactly_and_stops_at_its_limit(tmp_path):
    runs = []
    for k in range(2):
        store, judge = gold_project(tmp_path / f"p{k}", 40, overlap=0.5)
        run = run_panel(store, judge, PanelConfig(seed=7), ENTITIES, max_items=10)
        assert run.judged == {"sim-1": 10, "sim-2": 10, "sim-3": 10}
        runs.append([(j.user, j.item_id, j.scores) for js in by_user(store).values() for j in js])
    assert runs[0] == runs[1]
    # a second session carries on with what each has not seen: the 20 shared items reach all
    # three, each of the 20 others one of them
    run_panel(store, judge, PanelConfig(seed=7), ENTITIES)
    js = by_user(store)
    assert sum(len(v) for v in js.values()) == 20 * 3 + 20
    assert all(len({j.item_id for j in v}) == len(v) for v in js.values())


def _project_with_gold(tmp_path, n_prompts=12, cfg=None):
    cfg = cfg or AnnotateConfig(min_agreement_items=5, bootstrap_samples=0)
    store, tokens = make_project(tmp_path / "p", n_prompts=n_prompts, k=3, overlap=1.0, cfg=cfg)
    gold = [{"prompt_id": f"p{i}",
             "reference": {"entities": [{"name": n, "type": "ORG"} for n in _caps(DOCS[i % 6])]}}
            for i in range(n_prompts - 1)]  # fmt: skip  # the last prompt has no gold answer
    return store, tokens, write_jsonl(tmp_path / "gold.jsonl", gold)


def test_panel_judgements_are_marked_simulated_in_store_exports_and_dashboard(tmp_path):
    from alignforge.annotate.reference import read_references
    from alignforge.annotate.server import create_app

    store, tokens, gold = _project_with_gold(tmp_path)
    with store.connect() as conn:  # a person judges two items first, as usual
        alice = store.user_by_token(conn, tokens["alice"])
        for n in range(2):
            s = store.next_item(conn, alice)
            store.submit(conn, alice, s.item_id, f"a-{n}", {"entities": 1, "relations": 1,
                                                            "summary": 0})  # fmt: skip
    judge = ReferenceJudge(read_references(gold))
    noisy = PanelConfig(annotators=3, flip_rate=0.5, tie_rate=0.0, position_bias=0.0)
    run = run_panel(store, judge, noisy, {a.key: a.question for a in AnnotateConfig().aspects})
    assert set(run.judged) == {"sim-1", "sim-2", "sim-3"} and all(run.judged.values())
    assert run.skipped == 3 * 3 and "no reference answer for prompt_id 'p11'" in run.errors[0]
    with store.connect() as conn:
        js = store.judgements(conn)
        roles = {j.user: j.role for j in js}
        assert roles == {"alice": "annotator", "sim-1": "simulated", "sim-2": "simulated",
                         "sim-3": "simulated"}  # fmt: skip
        sims = {r["user"] for r in store.audit_trail(conn) if r["action"] == "skip"}
        assert sims == {"sim-1", "sim-2", "sim-3"}  # the items without gold, skipped as people do
        assert "sim-1" not in {u.name for u in store.user_rows(conn)}  # not a login
        with pytest.raises(StoreError, match="exists and is not simulated"):
            store.simulated_user(conn, "alice")
    with pytest.raises(StoreError, match="no user named 'sim-1'"):
        store.reset_token("sim-1")  # nobody can be given a simulated annotator's login

    humans, _ = build_records(store, ties="margin0")
    assert {a for r in humans for a in r["annotators"]} == {"alice"}
    assert not any(r["simulated"] for r in humans)
    panel, rep = build_records(store, ties="margin0", annotators="simulated")
    assert panel and all(r["simulated"] for r in panel)
    assert all(set(r["annotators"]) <= {"sim-1", "sim-2", "sim-3"} for r in panel)
    mixed, _ = build_records(store, ties="margin0", annotators="all")
    assert any(r["simulated"] and "alice" in r["annotators"] for r in mixed)

    cfg = AnnotateConfig(min_agreement_items=5, bootstrap_samples=0)
    aspects = [a.key for a in cfg.aspects]
    with store.connect() as conn:
        people = project_stats(store, conn, aspects, cfg.level, cfg.alert_rules(), n_boot=0)
        sim = project_stats(store, conn, aspects, cfg.level, cfg.alert_rules(), n_boot=0,
                            raters="simulated")  # fmt: skip
    assert [r.user for r in people.annotators] == ["alice"] and not people.alerts
    assert people.n_simulated == sum(run.judged.values())
    assert [r.user for r in sim.annotators] == ["sim-1", "sim-2", "sim-3"]
    assert all(r.skips == 3 for r in sim.annotators)
    assert sim.raters == "simulated" and sim.alerts  # flipping a coin: alpha near 0
    assert all(a.startswith("simulated annotators: ") for a in sim.alerts)
    assert "alpha below the floor" in sim.alerts[0]

    admin = TestClient(create_app(store.dir), follow_redirects=False)
    login(admin, tokens["admin"])
    page = admin.get("/admin").text
    assert f"{people.n_simulated} judgements by simulated annotators are not counted" in page
    page = admin.get("/admin?annotators=simulated").text
    assert "Dashboard: simulated annotators" in page and "sim-2" in page
    assert "simulated annotators: every item since the trial: alpha below the floor" in page
    assert admin.get("/admin/api/stats?annotators=simulated").json()["raters"] == "simulated"
    r = admin.get("/admin/plot/rate.png?annotators=simulated")
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert admin.get("/admin/annotators/sim-1").status_code == 200
    assert admin.get("/admin?annotators=robots").status_code == 422


def test_the_simulate_command_with_the_panel_from_annotate_yaml(tmp_path):
    runner = CliRunner()
    proj = tmp_path / "ann"
    yaml = tmp_path / "a.yaml"
    yaml.write_text("aspects:\n  - {key: entities, question: 'Which has better entities?'}\n"
                    "panel: {annotators: 2, flip_rate: 0.0, tie_rate: 0.0, position_bias: 0.0}\n"
                    "min_agreement_items: 5\nbootstrap_samples: 0\n")  # fmt: skip
    assert runner.invoke(app, ["init", str(proj), "--config", str(yaml)]).exit_code == 0
    rows = sample_rows(12, 3)
    for row in rows:  # the extractions of the helper; a has more entities than b in 2 of 3 pairs
        row["completions"][2]["text"] = row["completions"][1]["text"]
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    assert runner.invoke(app, ["import", str(proj), str(samples)]).exit_code == 0
    assert (
        runner.invoke(app, ["release", str(proj), "--batch", "b1", "--overlap", "0.5"]).exit_code
        == 0
    )
    gold = write_jsonl(tmp_path / "g.jsonl", [
        {"prompt_id": f"p{i}", "reference": {"entities": [
            {"name": n, "type": "ORG"} for n in _caps(DOCS[i % 6])]}} for i in range(12)
    ])  # fmt: skip
    r = runner.invoke(app, ["simulate", str(proj), "--reference", str(gold), "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "sim-1: judged" in r.output and "sim-3" not in r.output  # 2 annotators, from the yaml
    # no noise: the two agree on every decisive item and each label is right: ceiling 1
    assert "panel agreement 1.000" in r.output and "probability 1.000" in r.output
    r = runner.invoke(app, ["stats", str(proj), "--annotators", "simulated"])
    assert r.exit_code == 0 and "SIMULATED" in r.output and "sim-2" in r.output
    r = runner.invoke(app, ["stats", str(proj)])
    assert "judgements by simulated annotators left out" in r.output and "sim-1" not in r.output
    out = tmp_path / "prefs.jsonl"
    r = runner.invoke(app, ["export", str(proj), str(out), "--annotators", "simulated"])
    assert r.exit_code == 0 and "agreement ceiling 1.000" in r.output, r.output
    rec = [json.loads(x) for x in out.read_text().splitlines()]
    assert rec and all(x["simulated"] and x["agreement_ceiling"] == 1.0 for x in rec)
    r = runner.invoke(app, ["simulate", str(proj), "--reference", str(gold), "--flip-rate", "2"])
    assert r.exit_code == 2 and "--flip-rate" in r.output
    r = runner.invoke(app, ["users", str(proj)])
    assert "sim-1" not in r.output
    assert runner.invoke(app, ["simulate", "--help"]).exit_code == 0


def test_the_reward_model_reports_the_exported_ceiling():
    """The RM's ceiling: agreement_ceiling as set, else the mean of the held-out rows'
    agreement_ceiling column (0.8 and 0.9 -> 0.85), else of their agreement column."""
    from alignforge.recipes.reward import _ceiling

    pairs = [SimpleNamespace(index=i) for i in range(2)]
    rows = [
        {"agreement": 1.0, "agreement_ceiling": 0.8},
        {"agreement": 1.0, "agreement_ceiling": 0.9},
    ]
    unset = SimpleNamespace(agreement_ceiling=None)
    assert _ceiling(unset, rows, pairs) == pytest.approx(0.85)
    assert _ceiling(SimpleNamespace(agreement_ceiling=0.7), rows, pairs) == 0.7
    old = [{"agreement": 1.0}, {"agreement": 0.5, "agreement_ceiling": None}]
    assert _ceiling(unset, old, pairs) == pytest.approx(0.75)
    assert _ceiling(unset, [{}, {}], pairs) is None

    assert math.isnan(label_accuracy({}))  # no item judged twice: nothing to say


def test_the_documented_example_runs(capsys):
    """docs/annotate.md, "Simulated annotators": its Python example runs as written."""
    from doc_blocks import ROOT

    text = (ROOT / "docs/annotate.md").read_text()
    section = text.split("## Simulated annotators", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    exec(compile(code, "docs/annotate.md", "exec"), {"__name__": "doc_example"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "{'sim-1': 134, 'sim-2': 133, 'sim-3': 133}"
    assert out[2].startswith("True ") and out[3] == "0"
