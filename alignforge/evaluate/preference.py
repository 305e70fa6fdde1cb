"""Pairwise accuracy on preference pairs, beside the baselines that expose what it is worth.

    alignforge eval --task preference --data pairs.jsonl -o runs/eval-pref \\
        --system rm=runs/rm/final --system dpo=runs/dpo/final

A system *prefers* the answer it scores higher: a reward model its score, a DPO adapter its
implicit reward ``log pi(y|x) - log pi_ref(y|x)`` (the reference is the adapter switched off; the
missing beta does not change a sign), a plain model its mean log-prob per token. Ties count half.

Beside every system, on the same pairs, cut by the same rule as training (``fit_pair``):

* **coin flip**: 50%, and the range a fair coin lands in on this many pairs;
* **longer answer**: prefer the answer with more tokens (before truncation);
* **base log-prob**: prefer the answer the base model gives the higher mean log-prob per token;
* **untrained heads** (reward models): 1,000 freshly initialised score heads on the base
  model's last-token features, the spread a reward model's head starts from.

Accuracy has two 95% bootstrap intervals: resampling pairs, and resampling whole prompts (the
pairs of one prompt share it and are not independent). Both say only which *pairs* happened to
be sampled, not how a second training run would score. A system *beats* a baseline when the
by-prompt interval of its paired accuracy difference lies above 0 (the coin flip: when its
by-prompt interval lies above 50% and its accuracy above the coin's range), and beats the
untrained heads when its accuracy is above their 97.5th percentile. Length-split accuracy: on the pairs whose
chosen answer is the longer one, and on the rest (where length does not decide the preference);
the mean of the longer and the shorter cases is 50% for any rule that looks at length alone.
"""

from __future__ import annotations

import numpy as np

from alignforge.evaluate.stats import Estimate, bootstrap_by_group, bootstrap_ci

BASELINES = ("longer_answer", "base_logp")
LABELS = {
    "coin_flip": "coin flip",
    "longer_answer": "longer answer",
    "base_logp": "base log-prob/token",
    "untrained_heads": "untrained heads",
}
MIN_PAIRS = 50  # below this a coin flip's 95% range is wider than +-14 points
N_HEADS = 1000


# ---------------------------------------------------------------- statistics (numpy only)


def outcomes(chosen, rejected) -> np.ndarray:
    """``(N,)`` per pair: 1 when ``chosen > rejected``, 0.5 on a tie, 0 otherwise."""
    c, r = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    return (c > r) + 0.5 * (c == r)


def coin_range(n: int, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Where a fair coin's accuracy lands on ``n`` pairs, ``alpha/2`` to ``1 - alpha/2``."""
    draws = np.random.default_rng(seed).binomial(n, 0.5, size=20000) / n
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def random_head_accuracies(features, n_heads: int = N_HEADS, seed: int = 0) -> np.ndarray:
    """Accuracy of ``n_heads`` untrained score heads on last-token features ``(N, 2, H)``
    (chosen, rejected), each drawn as :class:`~alignforge.models.heads.ScalarHead` draws its
    weights, ``w ~ N(0, 1/(H+1))``; the bias cancels in ``w.h_c - w.h_r``."""
    f = np.asarray(features, dtype=np.float64)
    H = f.shape[-1]
    w = np.random.default_rng(seed).normal(0.0, (H + 1) ** -0.5, size=(H, n_heads))
    diff = (f[:, 0] - f[:, 1]) @ w  # (N, n_heads)
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=0)


def _ci(est: Estimate) -> list[float]:
    return [est.low, est.high]


def accuracy_block(won: np.ndarray, groups, n_boot: int, alpha: float, seed: int) -> dict:
    """Accuracy with its per-pair and by-prompt intervals."""
    return {
        "accuracy": float(won.mean()),
        "ci_pairs": _ci(bootstrap_ci(won, n_boot=n_boot, alpha=alpha, seed=seed)),
        "ci_prompts": _ci(bootstrap_by_group(won, groups, n_boot, alpha, seed)),
    }


def length_split(won: np.ndarray, lengths: np.ndarray) -> dict:
    """Accuracy where the chosen answer is longer, where it is not (shorter or equal: length
    does not decide), where it is shorter, and ``length_balanced``: the mean of the longer and
    shorter cases, 50% for any rule that looks at length alone."""

    def acc(where):
        return float(won[where].mean()) if where.any() else None

    longer, shorter = lengths[:, 0] > lengths[:, 1], lengths[:, 0] < lengths[:, 1]
    a, b = acc(longer), acc(shorter)
    return {
        "when_chosen_longer": a,
        "when_length_does_not_decide": acc(~longer),
        "when_chosen_shorter": b,
        "length_balanced": None if a is None or b is None else (a + b) / 2,
    }


def compare(won, base_won, groups, n_boot: int, alpha: float, seed: int) -> dict:
    """Paired accuracy difference to a baseline, interval resampling prompts."""
    diff = bootstrap_by_group(np.asarray(won) - np.asarray(base_won), groups, n_boot, alpha, seed)
    return {"difference": diff.value, "ci_prompts": _ci(diff), "beats": bool(diff.low > 0)}


def system_report(
    won: np.ndarray,
    lengths: np.ndarray,
    groups: list,
    baselines: dict[str, np.ndarray],
    head_accuracies: np.ndarray | None = None,
    categories: list | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Everything said about one system's per-pair outcomes ``won`` (:func:`outcomes`).

    ``baselines`` maps a name to the baseline's outcomes on the same pairs (``coin_flip`` is
    added here); ``head_accuracies`` are :func:`random_head_accuracies` when there are any.
    """
    won = np.asarray(won, dtype=float)
    report = {"n_pairs": int(won.size), "n_prompts": len({str(g) for g in groups})}
    report |= accuracy_block(won, groups, n_boot, alpha, seed)
    report |= length_split(won, lengths)
    coin = np.full_like(won, 0.5)
    report["vs"] = {
        name: compare(won, base, groups, n_boot, alpha, seed)
        for name, base in {"coin_flip": coin, **baselines}.items()
    }
    # a coin's own range too: a bootstrap of 3 right pairs out of 3 has zero width
    coin_high = coin_range(won.size, alpha, seed)[1]
    beats_coin = report["ci_prompts"][0] > 0.5 and won.mean() > coin_high
    report["vs"]["coin_flip"]["beats"] = bool(beats_coin)
    if head_accuracies is not None:
        top = float(np.quantile(head_accuracies, 1 - alpha / 2))
        report["vs"]["untrained_heads"] = {"above": top, "beats": bool(won.mean() > top)}
    if categories is not None:
        report["by_category"] = by_category(won, categories, groups, n_boot, alpha, seed)
    report["warnings"] = size_warnings(won.size, report["n_prompts"], alpha, seed)
    return report


def by_category(won, categories, groups, n_boot: int, alpha: float, seed: int) -> dict:
    cats = np.asarray([str(c) for c in categories])
    groups = np.asarray([str(g) for g in groups])
    return {
        c: {"n_pairs": int((cats == c).sum())}
        | accuracy_block(won[cats == c], groups[cats == c], n_boot, alpha, seed)
        for c in sorted(set(cats))
    }


def size_warnings(n: int, n_prompts: int, alpha: float = 0.05, seed: int = 0) -> list[str]:
    """What a small held-out set cannot tell."""
    out = []
    if n < MIN_PAIRS:
        lo, hi = coin_range(n, alpha, seed)
        out.append(
            f"only {n} pairs: a coin flip scores anywhere from {100 * lo:.0f}% to {100 * hi:.0f}% "
            "on so few, so this accuracy says next to nothing; hold out more pairs"
        )
    if n_prompts < 2:
        out.append("one prompt: the by-prompt interval has zero width and means nothing")
    return out


def heldout_report(scores, base_logps, pairs, features=None, categories=None, n_boot=1000, seed=0):
    """``(report, baselines)`` of a training run's held-out pairs (``PreferencePair`` list):
    ``scores`` and ``base_logps`` ``(N, 2)`` (chosen, rejected) of the trained model and of the
    model it started from (None: no base-model baseline, for methods that never score with it);
    ``features`` ``(N, 2, H)`` add the untrained heads."""
    lengths = np.array([p.lengths or (len(p.chosen_ids), len(p.rejected_ids)) for p in pairs])
    groups = [p.prompt_key for p in pairs]
    baselines = {"longer_answer": outcomes(lengths[:, 0], lengths[:, 1])}
    if base_logps is not None:
        baselines["base_logp"] = outcomes(base_logps[:, 0], base_logps[:, 1])
    heads = None if features is None else random_head_accuracies(features, seed=seed)
    won = outcomes(scores[:, 0], scores[:, 1])
    report = system_report(won, lengths, groups, baselines, heads, categories, n_boot, 0.05, seed)
    base = baseline_report(baselines, lengths, groups, heads, n_boot, 0.05, seed)
    return report, base


def baseline_report(
    baselines: dict[str, np.ndarray], lengths: np.ndarray, groups, head_acc, n_boot, alpha, seed
) -> dict:
    """The baselines' own accuracies, the share of pairs whose chosen answer is longer, the
    coin's range and the untrained heads' spread."""
    out = {
        name: accuracy_block(won, groups, n_boot, alpha, seed) for name, won in baselines.items()
    }
    n = len(lengths)
    out["coin_flip"] = {"accuracy": 0.5, "range": list(coin_range(n, alpha, seed))}
    out["chosen_longer_share"] = float((lengths[:, 0] > lengths[:, 1]).mean())
    out["equal_length_share"] = float((lengths[:, 0] == lengths[:, 1]).mean())
    if head_acc is not None:
        q = np.quantile(head_acc, [alpha / 2, 1 - alpha / 2])
        out["untrained_heads"] = {
            "n_heads": int(head_acc.size),
            "mean": float(head_acc.mean()),
            "range": [float(q[0]), float(q[1])],
        }
    return out


# ---------------------------------------------------------------- text


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _verdict(v: dict) -> str:
    if "difference" not in v:
        return "yes" if v["beats"] else "no"
    lo, hi = v["ci_prompts"]
    return f"{'yes' if v['beats'] else 'no'} ({100 * v['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}])"


def report_lines(report: dict, baselines: dict) -> list[str]:
    """A system's accuracy beside the baselines, for a run's printed summary."""
    cp, cg = report["ci_pairs"], report["ci_prompts"]
    coin = baselines["coin_flip"]["range"]
    parts = [f"coin flip 50% (lands in {_pct(coin[0])}-{_pct(coin[1])} on these pairs)"]
    parts += [f"{LABELS[k]} {_pct(baselines[k]['accuracy'])}" for k in BASELINES if k in baselines]
    if "untrained_heads" in baselines:
        h = baselines["untrained_heads"]
        parts.append(
            f"untrained heads {_pct(h['mean'])} (95% of them {_pct(h['range'][0])}-{_pct(h['range'][1])})"
        )
    lines = [
        f"  held-out accuracy {_pct(report['accuracy'])} [95% CI {_pct(cp[0])}-{_pct(cp[1])} by pair, "
        f"{_pct(cg[0])}-{_pct(cg[1])} by prompt] on {report['n_pairs']} pairs, {report['n_prompts']} prompts",
        f"  baselines: {'; '.join(parts)}; chosen answer longer in {_pct(baselines['chosen_longer_share'])}",
        "  beats: "
        + "; ".join(f"{LABELS.get(k, k)} {_verdict(v)}" for k, v in report["vs"].items()),
        f"  length-split: {_pct(report['when_chosen_longer'])} where the chosen answer is longer, "
        f"{_pct(report['when_length_does_not_decide'])} where it is not (mean {_pct(report['length_balanced'])})",
    ]
    return lines + [f"  WARNING: {w}" for w in report["warnings"]]


def results_markdown(results: dict) -> str:
    """The eval command's table: every system beside the baselines, then what each beats."""
    b = results["baselines"]
    rows = [
        "| system | n pairs | accuracy | 95% CI (pairs) | 95% CI (prompts) | chosen longer | length does not decide |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["systems"].items():
        cp, cg = r["ci_pairs"], r["ci_prompts"]
        rows.append(
            f"| {name} | {r['n_pairs']} | {_pct(r['accuracy'])} | {_pct(cp[0])}-{_pct(cp[1])} "
            f"| {_pct(cg[0])}-{_pct(cg[1])} | {_pct(r['when_chosen_longer'])} "
            f"| {_pct(r['when_length_does_not_decide'])} |"
        )
    for key in BASELINES:
        r = b[key]
        cp, cg = r["ci_pairs"], r["ci_prompts"]
        rows.append(
            f"| *{LABELS[key]}* | {results['n_pairs']} | {_pct(r['accuracy'])} "
            f"| {_pct(cp[0])}-{_pct(cp[1])} | {_pct(cg[0])}-{_pct(cg[1])} | | |"
        )
    coin = b["coin_flip"]["range"]
    rows.append(
        f"| *coin flip* | {results['n_pairs']} | 50.0% | {_pct(coin[0])}-{_pct(coin[1])} | | | |"
    )
    if "untrained_heads" in b:
        h = b["untrained_heads"]
        rows.append(
            f"| *untrained heads ({h['n_heads']})* | {results['n_pairs']} | {_pct(h['mean'])} "
            f"| {_pct(h['range'][0])}-{_pct(h['range'][1])} (spread of heads) | | | |"
        )
    text = [f"# Preference accuracy: {results['dataset']}", "", *rows, ""]
    text.append(
        f"{results['n_pairs']} pairs, {results['n_prompts']} prompts; the chosen answer is the "
        f"longer one in {_pct(b['chosen_longer_share'])} ({_pct(b['equal_length_share'])} equal). "
        "Intervals cover which pairs were sampled, not a second training run."
    )
    for name, r in results["systems"].items():
        text += [
            "",
            f"**{name}** beats: "
            + "; ".join(f"{LABELS.get(k, k)} {_verdict(v)}" for k, v in r["vs"].items()),
        ]
        for cat, c in (r.get("by_category") or {}).items():
            text.append(
                f"- {cat}: {_pct(c['accuracy'])} [{_pct(c['ci_prompts'][0])}-{_pct(c['ci_prompts'][1])}] on {c['n_pairs']} pairs"
            )
        text += [f"- WARNING: {w}" for w in r["warnings"]]
    return "\n".join(text) + "\n"
