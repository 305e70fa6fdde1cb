"""iterate's judge: reference, alone and with a panel of simulated annotators (no model needed:
the judge step runs on a samples file)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from alignforge.annotate.config import PanelConfig
from alignforge.annotate.store import Store
from alignforge.workflow import steps
from alignforge.workflow.config import IterateConfig
from tests.annotate.helpers import DOCS, _caps, sample_rows, write_jsonl

BASE = {"output_dir": "run", "policy": "default", "prompts": "p.jsonl"}


def test_judge_reference_and_panel_are_checked_in_the_config():
    cfg = IterateConfig(**BASE, judge="reference", panel={"annotators": 2, "flip_rate": 0.2})
    assert cfg.panel == PanelConfig(annotators=2, flip_rate=0.2)
    with pytest.raises(ValidationError, match="task 'instruction' is not extraction"):
        IterateConfig(**BASE, judge="reference", task="instruction")
    with pytest.raises(ValidationError, match="panel: the simulated annotators answer from"):
        IterateConfig(**BASE, judge="ai", panel={"annotators": 2})


@pytest.mark.parametrize("panel", [None, PanelConfig(annotators=3, flip_rate=0.1, seed=1)])
def test_the_judge_step_exports_the_reference_or_the_panel(tmp_path, panel):
    rows = sample_rows(6, 3)
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    refs = {r["prompt_id"]: {"entities": [{"name": n, "type": "ORG"} for n in _caps(DOCS[i])]}
            for i, r in enumerate(rows)}  # fmt: skip
    rep = steps.judge(samples, tmp_path / "judge", "reference", "default", None, None, refs, panel)
    assert rep["n_records"] > 0
    store = Store(tmp_path / "judge" / "annotate")
    with store.connect() as conn:
        users = {j.user for j in store.judgements(conn)}
    records = [json.loads(x) for f in (tmp_path / "judge" / "prefs").glob("*.jsonl")
               for x in f.read_text().splitlines()]  # fmt: skip
    if panel is None:
        assert users == {"judge:reference"}
        assert records and not any(r["simulated"] for r in records)
    else:  # the panel judged through the queue; its labels, not the reference's, are exported
        assert users == {"judge:reference", "sim-1", "sim-2", "sim-3"}
        assert records and all(r["simulated"] for r in records)
        assert all(set(r["annotators"]) <= {"sim-1", "sim-2", "sim-3"} for r in records)
        assert rep["agreement_ceiling"] is not None and 0.5 <= rep["agreement_ceiling"] <= 1.0
