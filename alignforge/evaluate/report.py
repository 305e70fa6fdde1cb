"""A self-contained HTML report of a run directory (plots embedded as base64 PNG).

    from alignforge.evaluate.report import build_report
    build_report("runs/my-run")                  # -> runs/my-run/report.html

The run directory is scanned recursively; any folder holding one of the files below is a
"stage" (``round_<k>`` anywhere in its path gives its round). Sections appear only when their
files exist, always in the order of ``SECTIONS``: summary, overview, evaluation, blind tests,
training curves, PPO diagnostics, reward distributions, annotator agreement, then the files that
could not be read. Within a section, stages come in the order the run wrote them (the oldest
known file of each), so a pipeline reads top to bottom as it ran.

The title is ``--title``, else the run's own name: ``run_name`` in the top folder's
``config.yaml``, else the systems of the summary's comparison ("base → sft → final"), else the
stage and model of the top folder's ``config.yaml``, else the folder's name. The folder is the
subtitle.

The summary is the ``results.json`` comparing the most systems (the latest written on a tie):
each system's headline metric, and its paired difference to the system before it and to the
first, each read as "improved", "no clear difference" or "worse" by whether its interval
excludes zero.

=========================== ==========================================================
file                        used for
=========================== ==========================================================
config.yaml                 stage name (``stage:``) in the overview; ``run_name`` as the title
metrics.jsonl               training curves; PPO reward/KL, ``offpolicy/*``, ``drift/*``
summary.json                overview
reward_scores_eval.json     reward distribution on the reward model's eval set
reward_scores_policy.jsonl  rewards seen by PPO per step (``{"step", "scores"|"score"}``)
results.json                ``alignforge eval`` results; summary; metric per round
agreement.json              per-aspect inter-annotator agreement (kappa / alpha)
blind.json                  blind-test win / tie / loss with CIs
=========================== ==========================================================
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from alignforge.evaluate import plots
from alignforge.evaluate.stats import improvement_header, verdict

KNOWN = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "reward_scores_eval.json",
    "reward_scores_policy.jsonl",
    "results.json",
    "agreement.json",
    "blind.json",
)
_ROUND = re.compile(r"^round_(\d+)$")


class StageDir(NamedTuple):
    path: Path
    rel: str
    round: int | None
    files: frozenset[str]


_STAGE_ORDER = (
    "datagen",
    "data",
    "sft",
    "rm",
    "reward",
    "annotate",
    "annotation",
    "dpo",
    "spin",
    "ppo",
    "eval",
    "blind",
)


def _order(stage: StageDir) -> tuple:
    """The order the run wrote its stages (the oldest known file of each); files written in the
    same instant go by round, then pipeline order (sft before rm before ppo ...), then path."""
    name = stage.path.name
    rank = _STAGE_ORDER.index(name) if name in _STAGE_ORDER else len(_STAGE_ORDER)
    written = min((stage.path / f).stat().st_mtime for f in stage.files)
    return (written, -1 if stage.round is None else stage.round, rank, stage.rel)


def scan_run(run_dir: str | Path) -> list[StageDir]:
    """Every folder under ``run_dir`` (itself included) holding a known file, in run order."""
    root = Path(run_dir)
    out = []
    for d in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        rel_parts = d.relative_to(root).parts
        if any(part.startswith(".") for part in rel_parts):
            continue
        files = frozenset(f for f in KNOWN if (d / f).is_file())
        if files:
            rounds = [int(m.group(1)) for p in rel_parts if (m := _ROUND.match(p))]
            out.append(
                StageDir(d, "/".join(rel_parts) or ".", rounds[-1] if rounds else None, files)
            )
    return sorted(out, key=_order)


# ---- small HTML helpers --------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(v: Any) -> float | None:
    """A number, or the ``value`` of an estimate dict; None otherwise."""
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _est(v: Any) -> tuple[float, float, float] | None:
    """(value, low, high) from an estimate dict / list / number (a number has no interval)."""
    if isinstance(v, dict) and _num(v) is not None:
        val = _num(v)
        return (val, float(v.get("low", val)), float(v.get("high", val)))
    if isinstance(v, list | tuple) and len(v) == 3 and all(_num(x) is not None for x in v):
        return tuple(float(x) for x in v)  # type: ignore[return-value]
    return (float(v),) * 3 if _num(v) is not None else None  # type: ignore[return-value]


def _fmt_est(v: Any, pct: bool = False) -> str:
    e = _est(v)
    if e is None:
        return "–"
    if e[1] == e[2] == e[0] and float(e[0]).is_integer() and not pct:
        return str(int(e[0]))  # a count
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f(e[0]) if e[1] == e[2] == e[0] else f"{f(e[0])} [{f(e[1])}, {f(e[2])}]"


class _Reader:
    """Reads files once, remembering the ones that could not be read."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._metrics: dict[Path, list[dict[str, Any]]] = {}
        self._json: dict[Path, Any] = {}

    def json(self, path: Path) -> Any:
        if path not in self._json:
            try:
                self._json[path] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                self.problems.append(f"{path}: {e}")
                self._json[path] = None
        return self._json[path]

    def metrics(self, stage: StageDir) -> list[dict[str, Any]]:
        p = stage.path / "metrics.jsonl"
        if "metrics.jsonl" not in stage.files:
            return []
        if p not in self._metrics:
            self._metrics[p] = plots.read_metrics(p)
        return self._metrics[p]

    def guard(self, what: str, fn: Callable[..., str], *args: Any, **kwargs: Any) -> str:
        """Render a block; a malformed file becomes a note instead of a crash."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            self.problems.append(f"{what}: {type(e).__name__}: {e}")
            return ""

    def img(self, what: str, plot: Callable[..., bytes], *args: Any, **kwargs: Any) -> str:
        """``<img>`` of ``plot(*args, **kwargs)``, guarded like ``guard``."""
        return self.guard(what, lambda: _img(plot(*args, **kwargs), what))


# ---- sections ------------------------------------------------------------------------------


def _config(stage: StageDir) -> dict[str, Any]:
    """The stage's ``config.yaml`` as a mapping; empty when absent or unreadable."""
    if "config.yaml" in stage.files:
        try:
            import yaml

            cfg = yaml.safe_load((stage.path / "config.yaml").read_text()) or {}
            return cfg if isinstance(cfg, dict) else {}
        except (OSError, ValueError):
            pass
    return {}


def _stage_name(stage: StageDir) -> str:
    return str(_config(stage).get("stage") or stage.path.name)


def _label(stage: StageDir) -> str:
    """The stage's folder relative to the run (the run folder's own name for the top one)."""
    return stage.path.name if stage.rel == "." else stage.rel


def _eval_title(res: dict[str, Any]) -> str:
    """Task and data file name, whichever are known: "extraction on test.jsonl (n = 48)"."""
    data = Path(str(res.get("dataset") or "")).name
    what = " on ".join(str(x) for x in (res.get("task"), data) if x) or "evaluation"
    return what if res.get("n") is None else f"{what} (n = {res['n']})"


def _eval_results(stages: list[StageDir], rd: _Reader) -> list[tuple[StageDir, dict[str, Any]]]:
    """Every ``results.json`` with a non-empty ``systems`` list, in run order."""
    out = []
    for s in (s for s in stages if "results.json" in s.files):
        res = rd.json(s.path / "results.json")
        if isinstance(res, dict) and isinstance(res.get("systems"), list) and res["systems"]:
            out.append((s, res))
        elif res is not None:
            rd.problems.append(f"{s.path / 'results.json'}: no 'systems' list")
    return out


def _comparison(stages: list[StageDir], rd: _Reader) -> tuple[StageDir, dict[str, Any]] | None:
    """The results comparing the most systems (two at least); the latest written on a tie."""
    found = [(len(r["systems"]), i, s, r) for i, (s, r) in enumerate(_eval_results(stages, rd))]
    found = [f for f in found if f[0] >= 2]
    return max(found, key=lambda f: f[:2])[2:] if found else None


def _delta(d: Any) -> tuple[str, str]:
    """A paired difference's cell ("+0.110 [+0.030, +0.200]") and how it reads."""
    e = _est(d)
    if e is None:
        return "–", "–"
    return f"{e[0]:+.3f} [{e[1]:+.3f}, {e[2]:+.3f}]", verdict(e[1], e[2])


def section_summary(stages: list[StageDir], rd: _Reader) -> str:
    found = _comparison(stages, rd)
    if found is None:
        return ""
    s, res = found
    primary, systems = res.get("primary", "score"), res["systems"]
    pct = round(100 * (1 - float(res.get("alpha") or 0.05)))
    names = [sy.get("name") or f"system {i + 1}" for i, sy in enumerate(systems)]
    rows, claims = [], []  # claims: (system, baseline, how it reads, difference)
    for i, sy in enumerate(systems):
        # results written before delta_vs_previous existed: the second system's is vs the first
        prev = sy.get("delta_vs_previous") or (sy.get("delta_vs_first") if i == 1 else None)
        cells = []
        for d in (prev, sy.get("delta_vs_first")):
            text, reads = _delta(d)
            cells += [f"{text} vs {d.get('baseline', '?')}" if reads != "–" else text, reads]
        if _est(prev):
            claims.append((names[i], prev.get("baseline", "?"), *_delta(prev)[::-1]))
        rows.append(
            [
                names[i],
                _fmt_est((sy.get("metrics") or {}).get(primary)),
                *cells,
                f"{100 * (sy.get('parse_failure_rate') or 0):.1f}%",
            ]
        )
    if len(systems) > 2 and _est(systems[-1].get("delta_vs_first")):
        claims.append((names[-1], names[0], *_delta(systems[-1]["delta_vs_first"])[::-1]))
    header = improvement_header([c[2] for c in claims])
    said = "; ".join(f"{a} vs {b}: {reads} ({d})" for a, b, reads, d in claims)
    head = ["system", f"{primary} [{pct}% CI]", f"Δ vs previous [{pct}% CI]", "reads as",
            f"Δ vs first [{pct}% CI]", "reads as", "parse failures"]  # fmt: skip
    return (
        f"<p class='headline'><strong>{_e(header)}</strong> ({_e(_eval_title(res))}): "
        f"{_e(said or 'no paired difference recorded')}.</p>"
        + _table(head, rows)
        + f"<p class='muted'>From {_e(_label(s))}/results.json. Each difference is paired (the "
        "same items resampled for both systems) and reads as “improved” or “worse” only when "
        "its interval excludes 0, otherwise as “no clear difference”.</p>"
    )


def _blind_verdict(win_rate: Any) -> str:
    """System A's win rate (a tie counts ½) against a coin: its interval above or below 50%."""
    e = _est(win_rate)
    return "–" if e is None else verdict(e[1], e[2], null=0.5)


def section_overview(stages: list[StageDir], rd: _Reader) -> str:
    rows = []
    for s in stages:
        summary = rd.json(s.path / "summary.json") if "summary.json" in s.files else None
        scalars = (
            {k: v for k, v in (summary or {}).items() if _num(v) is not None or isinstance(v, str)}
            if isinstance(summary, dict)
            else {}
        )
        text = ", ".join(
            f"{k}={_num(v):.4g}" if _num(v) is not None else f"{k}={v}"
            for k, v in list(scalars.items())[:8]
        )
        rows.append(
            [
                s.rel,
                "–" if s.round is None else s.round,
                _stage_name(s),
                ", ".join(sorted(s.files)),
                text,
            ]
        )
    return _table(["directory", "round", "stage", "files", "summary"], rows)


_PPO_KEYS = ("reward/mean", "kl")


def section_training(stages: list[StageDir], rd: _Reader) -> str:
    parts = []
    for s in stages:
        rows = rd.metrics(s)
        if not any("loss" in r for r in rows):
            continue
        title = f"{_label(s)} ({_stage_name(s)})"
        parts.append(f"<h3>{_e(title)}</h3>")
        parts.append(rd.img(f"loss {_label(s)}", plots.plot_loss_curve, rows, title=title))
        skip = {"step", "epoch", "loss", "lr", "learning_rate", *_PPO_KEYS}
        extra = sorted(
            {
                k
                for r in rows
                if r.get("split") == "eval"
                for k in r
                if k not in skip and "/" not in k and _num(r[k]) is not None
            }
        )[:4]
        if extra:
            parts.append(
                rd.img(
                    f"eval metrics {s.rel}", plots.plot_series, rows, extra, title="eval metrics"
                )
            )
    return "".join(parts)


def section_ppo(stages: list[StageDir], rd: _Reader) -> str:
    parts = []
    for s in stages:
        rows = rd.metrics(s)
        keys = sorted({k for r in rows for k in r})
        main = [k for k in _PPO_KEYS if k in keys]
        off = [k for k in keys if k.startswith("offpolicy/")]
        drift = [k for k in keys if k.startswith("drift/") and k != "drift/breached"]
        if not (main or off or drift):
            continue
        parts.append(f"<h3>{_e(_label(s))}</h3>")
        for label, ks in (("reward and KL", main), ("off-policy diagnostics", off)):
            if ks:
                parts.append(rd.img(f"{label} {s.rel}", plots.plot_series, rows, ks, title=label))
        if drift:
            breached = [r["step"] for r in rows if r.get("drift/breached")]
            parts.append(
                rd.img(
                    f"drift {s.rel}",
                    plots.plot_series,
                    rows,
                    drift,
                    title="reward drift",
                    marks=breached,
                    mark_label="breached",
                )
            )
            if breached:
                parts.append(
                    f"<p class='warn'>Drift threshold breached at {len(breached)} "
                    f"logged step(s), first at step {_e(breached[0])}.</p>"
                )
    return "".join(parts)


def _policy_scores(path: Path) -> list[tuple[float, list[float]]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        vals = row.get("scores", row.get("score", row.get("reward")))
        vals = vals if isinstance(vals, list) else [vals]
        vals = [float(v) for v in vals if _num(v) is not None]
        if vals and _num(row.get("step")) is not None:
            out.append((float(row["step"]), vals))
    return out


def section_rewards(stages: list[StageDir], rd: _Reader) -> str:
    by_round: dict[int | None, dict[str, Any]] = {}
    for s in stages:
        slot = by_round.setdefault(s.round, {"eval": [], "policy": []})
        if "reward_scores_eval.json" in s.files:
            data = rd.json(s.path / "reward_scores_eval.json")
            data = data.get("scores", []) if isinstance(data, dict) else data
            slot["eval"] += [float(v) for v in data or [] if _num(v) is not None]
        if "reward_scores_policy.jsonl" in s.files:
            slot["policy"] += _policy_scores(s.path / "reward_scores_policy.jsonl")
    parts = []
    for rnd in sorted(by_round, key=lambda r: -1 if r is None else r):
        ev, pol = by_round[rnd]["eval"], sorted(by_round[rnd]["policy"], key=lambda p: p[0])
        if not ev and not pol:
            continue
        groups: dict[str, list[float]] = {}
        if ev:
            groups["reward-model eval set"] = ev
        if pol:
            half = max(1, len(pol) // 2)
            chunks = [pol[:half], pol[half:]] if len(pol) > 1 else [pol]
            for c in chunks:
                groups[f"policy, steps {c[0][0]:g}–{c[-1][0]:g}"] = [v for _, vs in c for v in vs]
        title = "run" if rnd is None else f"round {rnd}"
        parts.append(f"<h3>{_e(title)}</h3>")
        parts.append(
            rd.img(
                f"rewards {title}",
                plots.plot_histograms,
                groups,
                title=f"reward distribution, {title}",
            )
        )
        parts.append(_reward_table(groups, ev))
    return "".join(parts)


def _reward_table(groups: dict[str, list[float]], ev: list[float]) -> str:
    lo, hi = np.quantile(ev, [0.01, 0.99]) if len(ev) >= 2 else (None, None)
    rows = []
    for name, v in groups.items():
        a = np.asarray(v, dtype=float)
        outside = "–" if lo is None else f"{100 * np.mean((a < lo) | (a > hi)):.1f}%"
        rows.append([name, len(a), f"{a.mean():.3f}", f"{a.std():.3f}", outside])
    return _table(["scores", "n", "mean", "std", "outside eval 1–99% range"], rows)


def _aspects(data: Any) -> dict[str, dict[str, Any]]:
    """{aspect: {statistic: value}} from {"aspects": {...}}, {aspect: {...}} or a list."""
    if isinstance(data, dict) and isinstance(data.get("aspects"), dict | list):
        data = data["aspects"]
    if isinstance(data, list):
        return {str(r.get("aspect", i)): r for i, r in enumerate(data) if isinstance(r, dict)}
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if isinstance(v, dict)}
    raise ValueError("agreement.json: expected per-aspect statistics")


def section_agreement(stages: list[StageDir], rd: _Reader) -> str:
    parts = []
    for s in (s for s in stages if "agreement.json" in s.files):
        data = rd.json(s.path / "agreement.json")
        if data is None:
            continue

        def render(data: Any = data, s: StageDir = s) -> str:
            aspects = _aspects(data)
            stats = sorted({k for v in aspects.values() for k in v if _est(v[k]) is not None})
            rows = [[a] + [_fmt_est(v.get(k)) for k in stats] for a, v in aspects.items()]
            out = f"<h3>{_e(_label(s))}</h3>" + _table(["aspect", *stats], rows)
            key = next((k for k in ("kappa", "alpha") if k in stats), None)
            if key:
                names = [a for a, v in aspects.items() if _est(v.get(key))]
                est = [_est(aspects[a][key]) for a in names]
                out += _img(
                    plots.plot_estimates(
                        names,
                        est,
                        title=f"agreement ({key}) per aspect",
                        ylabel=key,
                        ylim=(min(0.0, *(e[1] for e in est)), 1.0),
                    ),
                    f"agreement {s.rel}",
                )
            return out

        parts.append(rd.guard(str(s.path / "agreement.json"), render))
    return "".join(parts)


def _comparisons(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("comparisons"), list):
        data = data["comparisons"]
    rows = data if isinstance(data, list) else [data]
    out = [
        r
        for r in rows
        if isinstance(r, dict) and all(_est(r.get(k)) for k in ("win", "tie", "loss"))
    ]
    if not out:
        raise ValueError("blind.json: expected win / tie / loss rates")
    return out


def section_blind(stages: list[StageDir], rd: _Reader) -> str:
    parts = []
    for s in (s for s in stages if "blind.json" in s.files):
        data = rd.json(s.path / "blind.json")
        if data is None:
            continue

        def render(data: Any = data, s: StageDir = s) -> str:
            comps = _comparisons(data)
            labels = [
                c.get("label") or f"{c.get('system_a') or 'A'} vs {c.get('system_b') or 'B'}"
                for c in comps
            ]
            rows = [
                [
                    lab,
                    c.get("n", "–"),
                    *(_fmt_est(c.get(k), pct=True) for k in ("win", "tie", "loss", "win_rate")),
                    _blind_verdict(c.get("win_rate")),
                ]
                for lab, c in zip(labels, comps, strict=True)
            ]
            table = _table(
                ["comparison (A vs B)", "n", "A wins", "tie", "B wins", "A win rate (tie = ½)",
                 "A reads as"],
                rows,
            )  # fmt: skip
            png = plots.plot_win_tie_loss(
                [
                    (lab, _est(c["win"]), _est(c["tie"]), _est(c["loss"]))
                    for lab, c in zip(labels, comps, strict=True)
                ],
                title="blind test",
            )
            return f"<h3>{_e(_label(s))}</h3>" + table + _img(png, f"blind {s.rel}")

        parts.append(rd.guard(str(s.path / "blind.json"), render))
    return "".join(parts)


def section_eval(stages: list[StageDir], rd: _Reader) -> str:
    parts, per_round = [], {}
    for s, res in _eval_results(stages, rd):
        primary = res.get("primary", "score")
        parts.append(f"<h3>{_e(_label(s))}: {_e(_eval_title(res))}</h3>")
        rows = []
        for sy in res["systems"]:
            lat = sy.get("latency") or {}
            m = sy.get("metrics") or {}
            rows.append(
                [
                    sy.get("name"),
                    _fmt_est(m.get(primary)),
                    *(_fmt_est(m.get(k)) for k in list(m)[1:3] if k != primary),
                    " ".join(_delta(sy.get("delta_vs_first"))) if sy.get("delta_vs_first") else "–",
                    f"{100 * (sy.get('parse_failure_rate') or 0):.1f}%",
                    _fmt_num(lat.get("ttft_s_p50")),
                    _fmt_num(lat.get("tokens_per_s_mean"), 1),
                ]
            )
            if s.round is not None and _est(m.get(primary)):
                per_round.setdefault(sy.get("name"), []).append((s.round, _est(m[primary])))
        others = [k for k in list(res["systems"][0].get("metrics") or {})[1:3] if k != primary]
        head = ["system", primary, *others, f"Δ {primary} vs first (paired)", "parse failures"]
        parts.append(_table([*head, "TTFT p50 (s)", "tokens/s"], rows))
    if len({r for pts in per_round.values() for r, _ in pts}) >= 2:
        parts.insert(
            0,
            "<h3>metric per round</h3>"
            + rd.img(
                "metric per round",
                plots.plot_metric_by_round,
                per_round,
                title="eval metric per round (95% CI)",
            ),
        )
    return "".join(parts)


def _fmt_num(v: Any, digits: int = 3) -> str:
    return "–" if _num(v) is None else f"{_num(v):.{digits}f}"


# ---- page ----------------------------------------------------------------------------------

# The report's sections, in the order they always appear (docs/evaluate.md lists them).
SECTIONS = [
    ("summary", "Summary: the systems compared", section_summary),
    ("overview", "Run overview", section_overview),
    ("eval", "Evaluation", section_eval),
    ("blind", "Blind tests: win rates", section_blind),
    ("training", "Training curves", section_training),
    ("ppo", "PPO: reward, KL, off-policy and drift diagnostics", section_ppo),
    (
        "rewards",
        "Reward distributions and drift (reward-model eval set vs policy)",
        section_rewards,
    ),
    ("agreement", "Annotator agreement", section_agreement),
]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left}th{background:#f2f2f2}img{max-width:100%;display:block;margin:.5em 0}
nav a{margin-right:1em}.warn{color:#b00}.muted{color:#777;font-size:13px}
.subtitle{color:#555;margin-top:-.6em}.headline{font-size:16px}
"""


def _title(root: Path, stages: list[StageDir], rd: _Reader) -> str:
    """The run's own name: run_name, the systems compared, the stage and model, the folder."""
    top = next((s for s in stages if s.rel == "."), None)
    cfg = _config(top) if top else {}
    found = _comparison(stages, rd)
    if cfg.get("run_name"):
        return str(cfg["run_name"])
    if found:
        names = [str(sy.get("name") or "?") for sy in found[1]["systems"]]
        return f"{' → '.join(names)}: {_eval_title(found[1])}"
    if cfg.get("stage"):
        model = cfg.get("model_name_or_path")
        return f"{cfg['stage']} of {model}" if model else str(cfg["stage"])
    return root.resolve().name


def render_report(run_dir: str | Path, title: str | None = None) -> str:
    """The report's HTML text."""
    root = Path(run_dir)
    stages = scan_run(root)
    rd = _Reader()
    body, nav = [], []
    for sid, heading, fn in SECTIONS:
        content = rd.guard(heading, lambda fn=fn: fn(stages, rd)) if stages else ""
        if content:
            nav.append(f'<a href="#{sid}">{_e(heading.split(":")[0])}</a>')
            body.append(f'<section id="{sid}"><h2>{_e(heading)}</h2>{content}</section>')
    if not body:
        body.append("<p>No known files found (config.yaml, metrics.jsonl, results.json, ...).</p>")
    if rd.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in dict.fromkeys(rd.problems))
        body.append(
            f'<section id="problems"><h2>Skipped files</h2><ul class="warn">{items}</ul></section>'
        )
    name = title or _title(root, stages, rd)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(name)}'
        f"</title><style>{_CSS}</style></head><body><h1>{_e(name)}</h1>"
        f'<p class="subtitle">{_e(root.resolve())}</p>'
        f'<p class="muted">generated {stamp} by alignforge report</p>'
        f"<nav>{''.join(nav)}</nav>{''.join(body)}</body></html>"
    )


def build_report(
    run_dir: str | Path, output: str | Path | None = None, title: str | None = None
) -> Path:
    """Write the report (default ``run_dir/report.html``) and return its path."""
    out = Path(output) if output else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(run_dir, title), encoding="utf-8")
    return out
