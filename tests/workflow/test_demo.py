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
    # each difference says how it reads; the header claims improvement only when one improved
    reads = _reads(proc.stdout)
    assert set(reads) == {"sft vs base", "final vs sft", "final vs base", "blind test"}
    header = "What improved" if "improved" in reads.values() else "No clear improvement"
    assert f"{header}: base -> SFT -> SFT + RLHF" in proc.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    for stage in ("base", "sft", "final"):
        f1 = summary[stage]["metrics"]["f1"]
        assert 0.0 <= f1["low"] <= f1["value"] <= f1["high"] <= 1.0
    # SFT on the gold extractions teaches the output format: fewer unparseable answers than the base model
    assert summary["sft"]["parse_failure_rate"] < summary["base"]["parse_failure_rate"]
    blind = summary["blind"]
    assert (
        blind["n"] > 0
        and abs(blind["win"]["value"] + blind["tie"]["value"] + blind["loss"]["value"] - 1) < 1e-9
    )
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


READS = ("improved", "no clear difference", "worse")


def _reads(text: str) -> dict[str, str]:
    """How each difference of the demo's summary reads: the word its line ends with."""
    out = {}
    for line in text.splitlines():
        key = next((k for k in ("sft vs base", "final vs sft", "final vs base", "blind test")
                    if line.strip().startswith(k)), None)  # fmt: skip
        if key:
            out[key] = next(w for w in READS if line.endswith(w))
    return out


def _summary(sft_vs_base, final_vs_sft, final_vs_base, win_rate=(0.5, 0.4, 0.6)):
    est = lambda v, lo, hi: {"value": v, "low": lo, "high": hi}  # noqa: E731
    ev = lambda v: {"n": 48, "primary": "f1", "metrics": {"f1": est(v, v - 0.1, v + 0.1)},  # noqa: E731
                    "parse_failure_rate": 0.1}  # fmt: skip
    return {
        "base": ev(0.05), "sft": ev(0.16), "final": ev(0.2), "rounds": [],
        "compare": {"deltas": {"sft vs base": est(*sft_vs_base), "final vs sft": est(*final_vs_sft),
                               "final vs base": est(*final_vs_base)}},
        "blind": {"n": 32, "win": est(0.3, 0.2, 0.4), "tie": est(0.4, 0.3, 0.5),
                  "loss": est(0.3, 0.2, 0.4), "win_rate": est(*win_rate)},
        "export": {"skipped": "no llama.cpp"}, "report": "runs/demo/report.html",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("deltas", "win_rate", "header", "reads"),
    [
        # SFT helps, RLHF adds nothing clear: improvement claimed for SFT alone
        ([(0.11, 0.03, 0.2), (0.04, -0.05, 0.12), (0.15, 0.05, 0.25)], (0.5, 0.4, 0.6),
         "What improved", ["improved", "no clear difference", "improved", "no clear difference"]),
        # every interval contains 0, the blind win rate's contains 50%: no improvement claimed
        ([(0.03, -0.02, 0.09), (0.01, -0.06, 0.08), (0.04, -0.03, 0.11)], (0.55, 0.45, 0.65),
         "No clear improvement", ["no clear difference"] * 4),
        # RLHF made it worse, and the judge prefers SFT
        ([(0.02, -0.03, 0.08), (-0.1, -0.18, -0.02), (-0.08, -0.15, -0.01)], (0.3, 0.2, 0.4),
         "No clear improvement", ["no clear difference", "worse", "worse", "worse"]),
    ],
)  # fmt: skip
def test_summary_reads_each_paired_difference_and_claims_only_what_is_significant(
    deltas, win_rate, header, reads
):
    from alignforge.workflow.demo import format_summary

    text = format_summary(_summary(*deltas, win_rate=win_rate))
    assert text.splitlines()[2].startswith(f"{header}: base -> SFT -> SFT + RLHF on 48 held-out")
    assert list(_reads(text).values()) == reads
    line = next(x for x in text.splitlines() if x.strip().startswith("sft vs base"))
    assert line.endswith(
        f"{deltas[0][0]:+.3f} [{deltas[0][1]:+.3f}, {deltas[0][2]:+.3f}] {reads[0]}"
    )


def test_compare_pairs_base_sft_and_final_from_their_own_answers(tmp_path):
    """The comparison scores the answers each system's eval cached; no model is loaded (these
    paths hold none), and each system is paired with the one before it and with the first."""
    from alignforge.evaluate.runner import _prompt_hash, load_examples
    from alignforge.evaluate.tasks import get_task
    from alignforge.workflow.demo import CORPUS, _compare

    task = get_task("extraction")
    run = tmp_path / "demo"
    (run / "data").mkdir(parents=True)
    (run / "data" / "test.jsonl").write_text("".join(open(CORPUS).readlines()[:8]))
    examples = load_examples(task, run / "data" / "test.jsonl", limit=6)
    systems = {}
    for name, right in (("base", 0), ("sft", 3), ("final", 6)):  # gold answers to the first k
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(
            json.dumps({"id": e.id, "prompt": _prompt_hash(e.messages), "text": json.dumps(
                e.reference if i < right else {"entities": []}), "ttft_s": None, "n_tokens": 3,
                "seconds": 0.1}) + "\n" for i, e in enumerate(examples)))  # fmt: skip
        systems[name] = (str(tmp_path / f"no-model-{name}"), path)
    out = _compare(run, task, systems, n=6)
    assert list(out["deltas"]) == ["sft vs base", "final vs sft", "final vs base"]
    res = json.loads((run / "eval" / "compare" / "results.json").read_text())
    assert [s["name"] for s in res["systems"]] == ["base", "sft", "final"]
    assert res["dataset"].endswith("test.jsonl")
    f1 = {s["name"]: s["metrics"]["f1"]["value"] for s in res["systems"]}
    assert f1["final"] == 1.0 and out["deltas"]["final vs sft"]["value"] == 1.0 - f1["sft"]
