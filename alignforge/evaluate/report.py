"""A self-contained HTML report of a run directory (plots embedded as base64 PNG).

    from alignforge.evaluate.report import build_report
    build_report("runs/my-run")                  # -> runs/my-run/report.html

The run directory is scanned recursively; any folder holding one of the files below is a
"stage" (``round_<k>`` anywhere in its path gives its round). Sections appear only when their
files exist; unknown files are ignored and unreadable ones are listed at the end.

=========================== ==========================================================
file                        used for
=========================== ==========================================================
config.yaml                 stage name (``stage:``) in the overview
metrics.jsonl               training curves; PPO reward/KL, ``offpolicy/*``, ``drift/*``
summary.json                overview
reward_scores_eval.json     reward distribution on the reward model's eval set
reward_scores_policy.jsonl  rewards seen by PPO per step (``{"step", "scores"|"score"}``)
results.json                ``alignforge eval`` results; metric per round
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
    """Rounds in order; within a round, pipeline order (sft before rm before ppo ...)."""
    name = stage.path.name
    rank = _STAGE_ORDER.index(name) if name in _STAGE_ORDER else len(_STAGE_ORDER)
    return (-1 if stage.round is None else stage.round, rank, stage.rel)


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

    def json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            self.problems.append(f"{path}: {e}")
            return None

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


def _stage_name(stage: StageDir) -> str:
    if "config.yaml" in stage.files:
        try:
            import yaml

            cfg = yaml.safe_load((stage.path / "config.yaml").read_text()) or {}
            if isinstance(cfg, dict) and cfg.get("stage"):
                return str(cfg["stage"])
        except (OSError, ValueError):
            pass
    return stage.path.name


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
        title = f"{s.rel} ({_stage_name(s)})"
        parts.append(f"<h3>{_e(title)}</h3>")
        parts.append(rd.img(f"loss {s.rel}", plots.plot_loss_curve, rows, title=title))
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
        parts.append(f"<h3>{_e(s.rel)}</h3>")
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
            out = f"<h3>{_e(s.rel)}</h3>" + _table(["aspect", *stats], rows)
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
                c.get("label") or (f"{c.get('system_a', 'A')} vs {c.get('system_b', 'B')}")
                for c in comps
            ]
            rows = [
                [
                    lab,
                    c.get("n", "–"),
                    *(_fmt_est(c.get(k), pct=True) for k in ("win", "tie", "loss", "win_rate")),
                ]
                for lab, c in zip(labels, comps, strict=True)
            ]
            table = _table(
                ["comparison (A vs B)", "n", "A wins", "tie", "B wins", "A win rate (tie = ½)"],
                rows,
            )
            png = plots.plot_win_tie_loss(
                [
                    (lab, _est(c["win"]), _est(c["tie"]), _est(c["loss"]))
                    for lab, c in zip(labels, comps, strict=True)
                ],
                title="blind test",
            )
            return f"<h3>{_e(s.rel)}</h3>" + table + _img(png, f"blind {s.rel}")

        parts.append(rd.guard(str(s.path / "blind.json"), render))
    return "".join(parts)


def section_eval(stages: list[StageDir], rd: _Reader) -> str:
    parts, per_round = [], {}
    for s in (s for s in stages if "results.json" in s.files):
        res = rd.json(s.path / "results.json")
        if not isinstance(res, dict) or not isinstance(res.get("systems"), list):
            if res is not None:
                rd.problems.append(f"{s.path / 'results.json'}: no 'systems' list")
            continue
        primary = res.get("primary", "score")
        parts.append(
            f"<h3>{_e(s.rel)}: {_e(res.get('task', ''))} on "
            f"{_e(res.get('dataset', ''))} (n = {_e(res.get('n', '?'))})</h3>"
        )
        rows = []
        for sy in res["systems"]:
            lat = sy.get("latency") or {}
            m = sy.get("metrics") or {}
            rows.append(
                [
                    sy.get("name"),
                    _fmt_est(m.get(primary)),
                    *(_fmt_est(m.get(k)) for k in list(m)[1:3] if k != primary),
                    f"{100 * (sy.get('parse_failure_rate') or 0):.1f}%",
                    _fmt_num(lat.get("ttft_s_p50")),
                    _fmt_num(lat.get("tokens_per_s_mean"), 1),
                ]
            )
            if s.round is not None and _est(m.get(primary)):
                per_round.setdefault(sy.get("name"), []).append((s.round, _est(m[primary])))
        others = [k for k in list(res["systems"][0].get("metrics") or {})[1:3] if k != primary]
        parts.append(
            _table(["system", primary, *others, "parse failures", "TTFT p50 (s)", "tokens/s"], rows)
        )
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

SECTIONS = [
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
"""


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
        items = "".join(f"<li>{_e(p)}</li>" for p in rd.problems)
        body.append(
            f'<section id="problems"><h2>Skipped files</h2><ul class="warn">{items}</ul></section>'
        )
    name = title or root.resolve().name
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(name)}'
        f"</title><style>{_CSS}</style></head><body><h1>{_e(name)}</h1>"
        f'<p class="muted">{_e(root)} · generated {stamp} by alignforge report</p>'
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
