"""The README's main command, end to end on the embedded default model (the quick profile)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(1500)  # about 3 minutes on 2 idle cores
def test_demo_quick_runs_end_to_end_and_resumes(tmp_path, default_model_dir):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "alignforge.cli", "demo", "--quick", "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "What improved" in proc.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    for stage in ("base", "sft", "final"):
        f1 = summary[stage]["metrics"]["f1"]
        assert 0.0 <= f1["low"] <= f1["value"] <= f1["high"] <= 1.0
    # SFT on the gold extractions teaches the output format: fewer unparseable answers than the base model
    assert summary["sft"]["parse_failure_rate"] < summary["base"]["parse_failure_rate"]
    blind = summary["blind"]
    assert blind["n"] > 0 and abs(blind["win"]["value"] + blind["tie"]["value"] + blind["loss"]["value"] - 1) < 1e-9
    # the deployable artefact: the final policy as a 4-bit GGUF, scored on the final eval's items
    ship = summary["export"]
    if importlib.util.find_spec("llama_cpp"):
        assert ship["quant"] == "q4_0" and os.path.exists(ship["path"])
        assert ship["n"] == summary["final"]["n"] and ship["bytes"] < ship["fp32_bytes"] / 4
        f1 = ship["metrics"]["f1"]
        assert 0.0 <= f1["low"] <= f1["value"] <= f1["high"] <= 1.0
        assert ship["delta_vs_fp32"]["baseline"] == "fp32"
        assert "Deployable model:" in proc.stdout and "q4_0 - fp32 (paired" in proc.stdout
    else:
        assert "pip install 'alignforge[gguf]'" in ship["skipped"]
    html = (out / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    # a second run finds every step done and only re-renders the summary
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "done earlier, skipped" in again.stdout


def test_sft_picks_cap_the_share_of_empty_answers():
    from types import SimpleNamespace

    from alignforge.workflow.demo import _cap_empty

    task = SimpleNamespace(example=lambda row, i: SimpleNamespace(reference={"entities": row["e"]}))
    rows = [{"e": []} for _ in range(30)] + [{"e": ["x"]} for _ in range(10)]
    picked = _cap_empty(task, rows, list(range(40)), n=12)
    assert len(picked) == 12 and sum(not rows[i]["e"] for i in picked) == 3  # 25% of 12
    # too few full answers: the rest is filled with empty ones, still n in all
    picked = _cap_empty(task, rows, list(range(40)), n=20)
    assert len(picked) == 20 and sum(bool(rows[i]["e"]) for i in picked) == 10
