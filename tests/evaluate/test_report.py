"""`alignforge report`: a realistic run directory rendered to one self-contained HTML file."""

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import typer
from matplotlib.image import imread
from typer.testing import CliRunner

from alignforge.evaluate.cli import report_command
from alignforge.evaluate.plots import plot_loss_curve
from alignforge.evaluate.report import build_report, render_report, scan_run
from alignforge.evaluate.stats import win_tie_loss


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _est(v, w=0.05):
    return {"value": v, "low": v - w, "high": v + w}


def make_run(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for k in (1, 2):
        r = root / f"round_{k}"
        (r / "sft").mkdir(parents=True)
        (r / "sft" / "config.yaml").write_text("stage: sft\nlearning_rate: 2.0e-4\n")
        rows = [
            {
                "step": s,
                "split": "train",
                "epoch": s / 50,
                "loss": 2.5 * math.exp(-s / 30) + 0.1 * rng.random(),
                "lr": 2e-4 * (1 - s / 100),
            }
            for s in range(1, 100)
        ]
        rows += [
            {"step": s, "split": "eval", "loss": 2.0 * math.exp(-s / 40) + 0.3}
            for s in (25, 50, 75, 99)
        ]
        _jsonl(r / "sft" / "metrics.jsonl", rows)
        _json(r / "sft" / "summary.json", {"train_loss": 0.31, "eval_loss": 0.42, "steps": 99})
        (r / "rm").mkdir()
        (r / "rm" / "config.yaml").write_text("stage: rm\n")
        _jsonl(
            r / "rm" / "metrics.jsonl",
            [{"step": s, "split": "train", "loss": 0.69 - s / 200} for s in range(1, 50)]
            + [{"step": 49, "split": "eval", "loss": 0.5, "accuracy": 0.72}],
        )
        _json(r / "rm" / "reward_scores_eval.json", rng.normal(0, 1, 300).tolist())
        (r / "ppo").mkdir()
        (r / "ppo" / "config.yaml").write_text("stage: ppo\n")
        _jsonl(
            r / "ppo" / "metrics.jsonl",
            [
                {
                    "step": s,
                    "split": "train",
                    "reward/mean": 0.02 * s,
                    "kl": 0.001 * s,
                    "offpolicy/kl_k3": 0.01 + 0.001 * s,
                    "offpolicy/ess": 0.95 - 0.002 * s,
                    "offpolicy/frac_truncated": 0.01,
                    "drift/psi": 0.004 * s,
                    "drift/outlier_frac": 0.001 * s,
                    "drift/breached": s >= 45,
                }
                for s in range(1, 50)
            ],
        )
        _jsonl(
            r / "ppo" / "reward_scores_policy.jsonl",
            [{"step": s, "scores": rng.normal(0.05 * s, 1, 8).tolist()} for s in range(1, 50)],
        )
        _json(
            r / "eval" / "results.json",
            {
                "task": "extraction",
                "dataset": "test.jsonl",
                "n": 200,
                "primary": "f1",
                "systems": [
                    {
                        "name": "policy",
                        "metrics": {"f1": _est(0.5 + 0.1 * k), "lenient_f1": _est(0.7)},
                        "parse_failure_rate": 0.02,
                        "latency": {"ttft_s_p50": 0.05, "tokens_per_s_mean": 120.0},
                    },
                    {
                        "name": "frontier",
                        "metrics": {"f1": _est(0.66), "lenient_f1": _est(0.8)},
                        "parse_failure_rate": 0.0,
                        "latency": {"ttft_s_p50": 0.4, "tokens_per_s_mean": 60.0},
                    },
                ],
            },
        )
    _json(
        root / "annotation" / "agreement.json",
        {
            "aspects": {
                "entities": {"kappa": _est(0.61), "alpha": 0.6, "n": 120},
                "relations": {"kappa": _est(0.48), "alpha": 0.47, "n": 120},
                "summary": {"kappa": _est(0.35), "alpha": 0.33, "n": 120},
            }
        },
    )
    wtl = win_tie_loss(["win"] * 49 + ["tie"] * 24 + ["loss"] * 27, n_boot=300)
    _json(
        root / "blind" / "blind.json",
        {
            "system_a": "policy",
            "system_b": "frontier",
            "n": wtl.n,
            **{k: getattr(wtl, k)._asdict() for k in ("win", "tie", "loss", "win_rate")},
        },
    )
    (root / "notes.txt").write_text("not a known file")
    (root / "broken").mkdir()
    (root / "broken" / "agreement.json").write_text("{not json")
    return root


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report") / "run")
    return run, build_report(run)


def test_report_has_sections_and_valid_embedded_images(full_report):
    run, path = full_report
    assert {s.round for s in scan_run(run)} == {1, 2, None}
    html = path.read_text()
    for sid in ("overview", "eval", "blind", "training", "ppo", "rewards", "agreement"):
        assert f'<section id="{sid}">' in html, sid
    assert "metric per round" in html and "off-policy diagnostics" in html
    assert "Drift threshold breached" in html
    assert "policy vs frontier" in html and "49.0%" in html
    assert "entities" in html and "0.610 [0.560, 0.660]" in html
    assert "round_2/ppo" in html and "broken/agreement.json" in html  # listed as skipped
    assert "notes.txt" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no external assets
    imgs = _images(html)
    # per round: sft loss, rm loss + rm eval metrics, ppo reward/kl, off-policy, drift, rewards
    # = 7 x 2, plus metric per round, agreement, blind
    assert len(imgs) == 17
    for png in imgs:
        arr = imread(io.BytesIO(png), format="png")
        assert arr.ndim == 3 and arr.shape[0] > 100 and arr.shape[1] > 200


def test_sections_only_when_data_exists(tmp_path):
    sft = tmp_path / "sft"
    _jsonl(
        sft / "metrics.jsonl", [{"step": s, "split": "train", "loss": 1 / s} for s in range(1, 9)]
    )
    html = render_report(tmp_path)
    assert '<section id="training">' in html
    for sid in ("eval", "blind", "ppo", "rewards", "agreement", "problems"):
        assert f'<section id="{sid}">' not in html
    assert len(_images(html)) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No known files" in render_report(empty)


def test_plot_loss_curve_writes_png(tmp_path):
    rows = [
        {"step": 1, "split": "train", "loss": 2.0},
        {"step": 2, "split": "train", "loss": 1.5},
        {"step": 2, "split": "eval", "loss": 1.7},
    ]
    png = plot_loss_curve(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes() == png and png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no row has a numeric 'loss'"):
        plot_loss_curve([{"step": 1, "split": "train"}])


def test_cli_report(tmp_path):
    run = tmp_path / "run"
    _jsonl(run / "sft" / "metrics.jsonl", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    app = typer.Typer()
    app.command()(report_command)
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, [str(run), "--output", str(out), "--title", "Demo run"])
    assert res.exit_code == 0, res.output
    assert "<h1>Demo run</h1>" in out.read_text()


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path, full_report):
    path = full_report[1]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1280,4000",
            path.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    arr = imread(shot)
    assert arr.shape[0] >= 4000 - 1 and arr.std() > 0.05  # a page with content, not blank


# ---- a base -> SFT -> RLHF run: summary, title, headings, order, figure layout --------------


def _system(name, f1, prev=None, first=None, parse=0.0):
    sy = {"name": name, "metrics": {"f1": _est(f1)}, "parse_failure_rate": parse}
    for key, d in (("delta_vs_previous", prev), ("delta_vs_first", first)):
        if d is not None:
            sy[key] = {"baseline": d[0], "metric": "f1", "value": d[1], "low": d[2], "high": d[3]}
    return sy


def _results(systems, dataset=""):
    return {"task": "extraction", "dataset": dataset, "n": 12, "primary": "f1", "alpha": 0.05,
            "systems": systems}  # fmt: skip


def make_pipeline_run(root: Path, sft_vs_base=(0.2, 0.05, 0.35), final_vs_sft=(0.02, -0.1, 0.14)):
    """The demo's layout, written in pipeline order; the folders' names sort differently
    (eval/compare before eval/sft before rlhf), so only the order written puts them right."""
    d1, d2 = sft_vs_base, final_vs_sft
    final_vs_base = (d1[0] + d2[0], d1[1] + d2[1], d1[2] + d2[2])
    written = []

    def put(path, obj):
        (_jsonl if path.suffix == ".jsonl" else _json)(path, obj)
        written.append(path)

    put(root / "eval/base/results.json", _results([_system("base", 0.1, parse=0.9)]))
    put(
        root / "sft/metrics.jsonl",
        [{"step": s, "split": "train", "loss": 1 / s} for s in range(1, 9)],
    )
    put(root / "eval/sft/results.json", _results([_system("sft", 0.3)]))
    offpolicy = [f"offpolicy/stat_{i:02d}" for i in range(12)]
    put(
        root / "rlhf/round_1/ppo/metrics.jsonl",
        [{"step": s, "split": "train", "reward/mean": 0.1 * s, "kl": 0.01 * s,
          **{k: 0.01 * s * (i + 1) for i, k in enumerate(offpolicy)}} for s in range(1, 6)],
    )  # fmt: skip
    put(root / "rlhf/round_1/eval/results.json", _results([_system("round_1", 0.32)]))
    put(
        root / "eval/compare/results.json",
        _results(
            [
                _system("base", 0.1, parse=0.9),
                _system("sft", 0.3, ("base", *d1), ("base", *d1)),
                _system("final", 0.32, ("sft", *d2), ("base", *final_vs_base)),
            ],
            dataset="runs/demo/data/test.jsonl",
        ),
    )
    for i, path in enumerate(written):  # one second apart, oldest first
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
    return root


def _figures(html: str) -> dict[str, tuple[int, int]]:
    """alt text -> (width, height) in pixels of each embedded PNG."""
    out = {}
    for alt, data in re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', html):
        arr = imread(io.BytesIO(base64.b64decode(data)), format="png")
        out[alt] = (arr.shape[1], arr.shape[0])
    return out


def test_report_title_summary_headings_order_and_figure_grid(tmp_path):
    run = make_pipeline_run(tmp_path / "demo-run")
    html = render_report(run)
    # title: the systems compared, the folder as the subtitle
    assert "<h1>base → sft → final: extraction on test.jsonl (n = 12)</h1>" in html
    assert f'<p class="subtitle">{run.resolve()}</p>' in html
    # sections in the fixed order, the summary first
    ids = re.findall(r'<section id="([a-z]+)">', html)
    assert ids == ["summary", "overview", "eval", "training", "ppo"]
    # the summary: base -> sft -> final with each paired difference and how it reads
    summary = html.split('<section id="summary">')[1].split("</section>")[0]
    assert "<strong>What improved</strong>" in summary
    assert "sft vs base: improved (+0.200 [+0.050, +0.350])" in summary
    assert "final vs sft: no clear difference (+0.020 [-0.100, +0.140])" in summary
    # intervals of sft - base and final - sft added: [-0.05, +0.49]
    assert "final vs base: no clear difference (+0.220 [-0.050, +0.490])" in summary
    rows = re.findall(r"<tr><td>(base|sft|final)</td>", summary)
    assert rows == ["base", "sft", "final"]
    # eval headings: never an empty name (base's results have no dataset: the task stands alone);
    # in the order the run wrote them, not by folder name
    headings = re.findall(r"<h3>([^<]*extraction[^<]*)</h3>", html)
    assert headings == [
        "eval/base: extraction (n = 12)",
        "eval/sft: extraction (n = 12)",
        "rlhf/round_1/eval: extraction (n = 12)",
        "eval/compare: extraction on test.jsonl (n = 12)",
    ]
    assert not re.search(r" on +\(|<h3>[^<]*:\s*\(", html)
    # figures fit a 1366-px screen: 12 off-policy panels in a 3-wide grid of 4 rows
    figures = _figures(html)
    assert max(w for w, _ in figures.values()) <= 1200
    width, height = figures["off-policy diagnostics rlhf/round_1/ppo"]
    assert (width, height) == (3 * 4 * 90, 4 * round(3.2 * 90))
    assert figures["reward and KL rlhf/round_1/ppo"] == (2 * 4 * 90, round(3.2 * 90))


@pytest.mark.parametrize(
    ("sft_vs_base", "final_vs_sft", "header", "reads"),
    [
        ((0.2, 0.05, 0.35), (0.02, -0.1, 0.14), "What improved", ("improved", "no clear difference")),
        ((0.05, -0.02, 0.12), (0.01, -0.1, 0.12), "No clear improvement",
         ("no clear difference", "no clear difference")),
        ((-0.2, -0.3, -0.1), (0.0, -0.05, 0.05), "No clear improvement", ("worse", "no clear difference")),
    ],
)  # fmt: skip
def test_summary_says_whether_each_paired_interval_excludes_zero(
    tmp_path, sft_vs_base, final_vs_sft, header, reads
):
    html = render_report(make_pipeline_run(tmp_path / "run", sft_vs_base, final_vs_sft))
    summary = html.split('<section id="summary">')[1].split("</section>")[0]
    assert f"<strong>{header}</strong>" in summary
    assert f"sft vs base: {reads[0]} (" in summary and f"final vs sft: {reads[1]} (" in summary
    if header != "What improved":
        assert "improved (" not in summary  # no difference is claimed as an improvement


def test_title_is_the_configs_run_name_else_its_stage_and_model(tmp_path):
    run = tmp_path / "sft-try"
    _jsonl(run / "metrics.jsonl", [{"step": s, "split": "train", "loss": 1 / s} for s in (1, 2)])
    (run / "config.yaml").write_text("stage: sft\nmodel_name_or_path: default\n")
    html = render_report(run)
    assert "<h1>sft of default</h1>" in html and "<h3>sft-try (sft)</h3>" in html
    (run / "config.yaml").write_text("stage: sft\nrun_name: lr-sweep-3\n")
    assert "<h1>lr-sweep-3</h1>" in render_report(run)
    (run / "config.yaml").unlink()
    assert "<h1>sft-try</h1>" in render_report(run)
