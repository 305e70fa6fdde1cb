"""Off-policy correction in PPO: mismatched (int8) and stale rollouts, correction off vs on.

    python benchmarks/offpolicy.py                       # ~5 min on 2 CPU cores
    python benchmarks/offpolicy.py --steps 60 --seeds 0 1 2

Same PPO setup every time (a tiny random Llama with LoRA on attention, MLP and LM head,
programmatic reward = share of answer tokens with an id below 192, GAE critic), with the
rollouts coming from

* ``on-policy``: the trained policy itself (reference run);
* ``int8``: an int8 dynamically-quantised copy of the policy (``rollout_precision=int8``);
* ``stale-k``: batches sampled ``k`` PPO steps ago (``max_staleness=k``);

and, for the last two, the correction ``none``, ``truncate`` (TIS, token level, upper 2) or
``mask`` (IcePop-style token rejection outside [0.5, 2]). Writes ``docs/img/offpolicy_*.png``
and ``benchmarks/results/offpolicy.json``; the write-up is ``docs/offpolicy.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "rlhf")]

KEYS = (
    "reward/mean",
    "kl",
    "offpolicy/kl_k3",
    "offpolicy/ess",
    "offpolicy/frac_truncated",
    "offpolicy/frac_masked",
)


def settings(staleness: int) -> dict[str, dict]:
    corr = {
        "none": {"offpolicy_correction": "none"},
        "truncate": {"offpolicy_correction": "truncate", "offpolicy_upper": 2.0},
        "mask": {"offpolicy_correction": "mask", "offpolicy_lower": 0.5, "offpolicy_upper": 2.0},
    }
    runs = {"on-policy": {}}
    for name, c in corr.items():
        runs[f"int8/{name}"] = {"rollout_precision": "int8", **c}
        runs[f"stale-{staleness}/{name}"] = {"max_staleness": staleness, **c}
    return runs


def one_run(model: str, data: str, out: Path, seed: int, steps: int, extra: dict) -> list[dict]:
    from alignforge.config import build_config
    from alignforge.config.rlhf import PPOConfig
    from alignforge.recipes import ppo

    cfg = build_config(
        PPOConfig,
        dict(
            model_name_or_path=model,
            dataset=data,
            output_dir=str(out),
            reward_fn="alignforge.rl.scoring:token_fraction",
            reward_fn_kwargs={"target_ids": list(range(3, 192))},
            lora_target=["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"],
            lora_dropout=0.0,
            max_length=48,
            max_new_tokens=12,
            rollout_batch_size=16,
            mini_batch_size=8,
            ppo_epochs=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            kl_coef=0.02,
            max_steps=steps,
            seed=seed,
            progress=False,
            **extra,
        ),
    )
    ppo.run(cfg)
    return [json.loads(x) for x in open(out / "metrics.jsonl") if json.loads(x)["split"] == "train"]


def aggregate(runs: dict[str, list[list[dict]]]) -> dict:
    table = {}
    for name, per_seed in runs.items():
        q = max(1, len(per_seed[0]) // 4)
        row = {}
        for k in KEYS:
            curves = np.array([[r.get(k, np.nan) for r in rows] for rows in per_seed])
            row[k] = curves.mean(0).tolist()
        rewards = np.array([[r["reward/mean"] for r in rows] for rows in per_seed])
        row["reward_last_quarter"] = float(rewards[:, -q:].mean())
        row["reward_last_quarter_seed_std"] = float(rewards[:, -q:].mean(1).std())
        row["kl_last_quarter"] = float(np.mean(row["kl"][-q:]))
        for k in KEYS[2:]:
            row[f"{k}_mean"] = float(np.nanmean(row[k]))
        table[name] = row
    return table


def plot(table: dict, prefix: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["on-policy"] + [n for n in table if n.startswith(prefix)]
    panels = ("reward/mean", "kl", "offpolicy/kl_k3", "offpolicy/ess")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key in zip(axes, panels, strict=True):
        for n in names:
            y = np.asarray(table[n][key])
            if key == "reward/mean":  # 5-step moving average: single batches are noisy
                y = np.convolve(y, np.ones(5) / 5, mode="valid")
            ax.plot(
                np.arange(1, len(y) + 1), y, label=n, lw=1.4, ls="--" if n == "on-policy" else "-"
            )
        ax.set_title(key + (" (5-step mean)" if key == "reward/mean" else ""))
        ax.set_xlabel("PPO step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"PPO with {prefix} rollouts: correction off vs on (mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--staleness", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from helpers import prompt_rows, write_jsonl
    from tiny import make_model, make_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="offpolicy-"))
    make_model(work / "model", make_tokenizer(work / "model"))
    data = write_jsonl(work / "prompts.jsonl", prompt_rows(64))
    runs: dict[str, list[list[dict]]] = {}
    for name, extra in settings(args.staleness).items():
        for seed in args.seeds:
            out = work / name.replace("/", "_") / f"seed{seed}"
            runs.setdefault(name, []).append(
                one_run(str(work / "model"), data, out, seed, args.steps, extra)
            )
            print(
                f"{name} seed {seed}: last reward {runs[name][-1][-1]['reward/mean']:.3f}",
                flush=True,
            )
    table = aggregate(runs)
    plot(table, "int8", ROOT / "docs/img/offpolicy_int8.png")
    plot(table, f"stale-{args.staleness}", ROOT / "docs/img/offpolicy_stale.png")
    res = ROOT / "benchmarks/results/offpolicy.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps({"args": vars(args), "runs": table}, indent=1))
    print(
        f"\n{'run':<22}{'reward(last q)':>16}{'KL(last q)':>12}{'mismatch k3':>13}{'ESS':>8}{'trunc':>8}{'masked':>8}"
    )
    for n, r in table.items():
        print(
            f"{n:<22}{r['reward_last_quarter']:>10.3f} ±{r['reward_last_quarter_seed_std']:.3f}"
            f"{r['kl_last_quarter']:>12.3f}{r['offpolicy/kl_k3_mean']:>13.5f}{r['offpolicy/ess_mean']:>8.3f}"
            f"{r['offpolicy/frac_truncated_mean']:>8.3f}{r['offpolicy/frac_masked_mean']:>8.3f}"
        )


if __name__ == "__main__":
    main()
