"""Off-policy correction on a real engine mismatch: the trainer in fp32, rollouts from
``alignforge serve`` in bf16 or int8 in another process, drawn 0, 1 or 2 steps ahead.

    flock /tmp/heavy.lock python benchmarks/offpolicy_server.py       # resumable
    python benchmarks/offpolicy_server.py --plot-only                  # tables and plots again
    python benchmarks/offpolicy_server.py --plot-only --exact-kl       # + each engine's exact KL

PPO on the embedded default model (SmolLM2-135M-Instruct, ``model_name_or_path: default``), LoRA
rank 16 on every linear layer, trained in float32; RLOO (4 prompts x 2 answers a step, 48 new
tokens), 2 mini-batches of 4 per step, learning rate 1e-3, fixed KL coefficient 0.05 in the
reward; reward: ``length_reward`` toward 16 tokens (the model's answers run past 48, so the
reward asks for a change it can make in a few steps). The rollouts come from ``alignforge serve
default`` in a subprocess, the policy's adapter loaded after each update
(``rollout_engine: server``), serving in

* ``float32``: the trainer's precision (control: mismatch from batching alone);
* ``bfloat16``: ``--dtype bfloat16``;
* ``int8``: ``--quantization int8`` (torch's dynamic int8 matmuls under a float32 LoRA);

with ``max_staleness`` 0, 1, 2 (each batch drawn that many steps ahead, in the background) and
``offpolicy_correction`` ``none``, ``truncate`` (TIS at 2) or ``mask`` (tokens with ratio outside
[0.5, 2] leave the loss), token level; ``GRID`` says which cells run. Each cell runs
``--seeds``; the curves of every run go to ``benchmarks/results/offpolicy_server.json`` as soon
as it ends, and a re-run skips the runs found there with the same settings. Plots:
``docs/img/offpolicy_server_{bfloat16,int8}.png``. The write-up is ``docs/offpolicy.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import start  # noqa: E402  (benchmarks/serving.py: start a server, wait for /models)

from alignforge.rollout.server import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks/results/offpolicy_server.json"
CORRECTIONS = {
    "none": {"offpolicy_correction": "none"},
    "truncate": {"offpolicy_correction": "truncate", "offpolicy_upper": 2.0},
    "mask": {"offpolicy_correction": "mask", "offpolicy_lower": 0.5, "offpolicy_upper": 2.0},
}
# (engine, staleness values, corrections), each cell run with every seed, in this order (what
# matters most first, should the run be cut short): bf16 is the main grid, staleness 1 without
# correction only; int8 and the float32 control draw on-policy, to fit 2 CPU cores
GRID = [
    ("bfloat16", (0,), ("none", "truncate", "mask")),
    ("float32", (0,), ("none",)),
    ("bfloat16", (2,), ("none", "truncate", "mask")),
    ("int8", (0,), ("none", "truncate", "mask")),
    ("bfloat16", (1,), ("none",)),
]
SERVE_FLAGS = {
    "float32": [],
    "bfloat16": ["--dtype", "bfloat16"],
    "int8": ["--quantization", "int8"],
}
KEYS = ("reward/mean", "kl", "offpolicy/kl_k3", "offpolicy/ess", "offpolicy/frac_truncated",
        "offpolicy/frac_masked", "staleness", "response_length", "time/generate")  # fmt: skip


def settings(args) -> dict:
    """What every run shares; a stored run with other settings is run again."""
    return dict(
        model_name_or_path="default", lora_rank=16, lora_target="all",
        advantage_estimator="rloo", rollout_batch_size=4, num_generations=2, mini_batch_size=4,
        ppo_epochs=1, max_new_tokens=48, max_length=256, learning_rate=args.learning_rate,
        lr_scheduler_type="constant", kl_coef=0.05, max_steps=args.steps,
        reward_fn="alignforge.rl.scoring:length_reward", reward_fn_kwargs={"target_length": 16},
    )  # fmt: skip


def one_run(base: dict, data: Path, out: Path, url: str, staleness: int, correction: str,
            seed: int) -> list[dict]:  # fmt: skip
    from alignforge.config import build_config
    from alignforge.config.rlhf import PPOConfig
    from alignforge.recipes import ppo

    cfg = build_config(PPOConfig, dict(
        base, dataset=str(data), output_dir=str(out), rollout_engine="server",
        rollout_base_url=url, rollout_model="policy", max_staleness=staleness, seed=seed,
        progress=False, drift_action="none", **CORRECTIONS[correction],
    ))  # fmt: skip
    ppo.run(cfg)
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return [{k: r.get(k) for k in ("step", *KEYS)} for r in rows if r["split"] == "train"]


def run_grid(args, store: dict) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="offpolicy-server-"))
    rows = json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())[:64]
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["instruction"]}) + "\n" for r in rows))
    base = settings(args)
    for engine, stalenesses, corrections in GRID:
        todo = [(k, c, s) for k in stalenesses for c in corrections for s in args.seeds
                if store["runs"].get(f"{engine}/{c}/stale-{k}/seed{s}", {}).get("settings") != base]  # fmt: skip
        if not todo:
            continue
        port = free_port()
        cmd = [sys.executable, "-m", "alignforge.cli", "serve", "default", "--port", str(port),
               "--model-name", "policy", *SERVE_FLAGS[engine]]  # fmt: skip
        proc, url = start(cmd, port, args.threads, work / f"serve-{engine}.log")
        try:
            for k, c, s in todo:
                name = f"{engine}/{c}/stale-{k}/seed{s}"
                t0 = time.time()
                curve = one_run(base, data, work / name.replace("/", "_"), url, k, c, s)
                store["runs"][name] = {"settings": base, "seconds": time.time() - t0,
                                       "load_avg_1m": os.getloadavg()[0], "curve": curve}  # fmt: skip
                RESULTS.write_text(json.dumps(store, indent=1))
                print(f"{name}: {time.time() - t0:.0f} s, reward {curve[-1]['reward/mean']:.3f}, "
                      f"mismatch k3 {np.mean([r['offpolicy/kl_k3'] for r in curve]):.5f}", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)


def cells(store: dict) -> dict[str, list[list[dict]]]:
    """Cell name (engine/correction/stale-k) -> the curves of its seeds."""
    out: dict[str, list[list[dict]]] = {}
    for name, run in sorted(store["runs"].items()):
        out.setdefault(name.rsplit("/", 1)[0], []).append(run["curve"])
    return out


def summary(curves: list[list[dict]]) -> dict:
    """Per seed: reward and KL over the second half, mismatch over the run; then mean and spread
    (standard deviation over seeds)."""

    def per_seed(key, part):
        return np.array([np.mean([r[key] for r in c[part]]) for c in curves])

    half = slice(len(curves[0]) // 2, None)
    allsteps = slice(None)
    reward = per_seed("reward/mean", half)
    return {
        "seeds": len(curves),
        "reward_first_2": float(per_seed("reward/mean", slice(0, 2)).mean()),
        "reward_second_half": float(reward.mean()), "reward_second_half_spread": float(reward.std()),
        "kl_second_half": float(per_seed("kl", half).mean()),
        "kl_second_half_spread": float(per_seed("kl", half).std()),
        "mismatch_k3": float(per_seed("offpolicy/kl_k3", allsteps).mean()),
        "mismatch_k3_spread": float(per_seed("offpolicy/kl_k3", allsteps).std()),
        "ess": float(per_seed("offpolicy/ess", allsteps).mean()),
        "ess_min": float(min(r["offpolicy/ess"] for c in curves for r in c)),
        "frac_truncated": float(per_seed("offpolicy/frac_truncated", allsteps).mean()),
        "frac_masked": float(per_seed("offpolicy/frac_masked", allsteps).mean()),
    }  # fmt: skip


def table(stats: dict[str, dict]) -> str:
    head = ["engine / correction / staleness", "seeds", "reward, steps 1-2", "reward, 2nd half",
            "KL to ref, 2nd half", "mismatch k3 (per token)", "ESS (min)", "truncated",
            "masked"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['seeds']} | {s['reward_first_2']:.3f} "
            f"| {s['reward_second_half']:.3f} ± {s['reward_second_half_spread']:.3f} "
            f"| {s['kl_second_half']:.3f} ± {s['kl_second_half_spread']:.3f} "
            f"| {s['mismatch_k3']:.2e} ± {s['mismatch_k3_spread']:.1e} "
            f"| {s['ess']:.4f} ({s['ess_min']:.4f}) | {100 * s['frac_truncated']:.2f}% "
            f"| {100 * s['frac_masked']:.2f}% |"
        )
    return "\n".join(lines)


def plot(by_cell: dict, engine: str, path: Path) -> None:
    """One row per staleness, one column per measure; a line per correction (mean over seeds),
    the float32 server's on-policy run dashed in every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward/mean", "reward"), ("kl", "KL to reference (k1, per answer)"),
              ("offpolicy/kl_k3", "mismatch k3 (per token)"), ("offpolicy/ess", "ESS"),
              ("cut", "tokens truncated / masked")]  # fmt: skip
    mine = {n: c for n, c in by_cell.items() if n.startswith(engine + "/")}
    stale = sorted({int(n.rsplit("-", 1)[1]) for n in mine})
    control = by_cell.get("float32/none/stale-0") if engine != "float32" else None
    fig, axes = plt.subplots(len(stale), len(panels), figsize=(20, 3.4 * len(stale)), squeeze=False)
    for row, k in zip(axes, stale, strict=True):
        lines = [(n.split("/")[1], c, "-") for n, c in mine.items() if n.endswith(f"stale-{k}")]
        lines += [("float32 server, none", control, "--")] if control else []
        for ax, (key, title) in zip(row, panels, strict=True):
            for label, curves, ls in lines:
                if key == "cut":
                    y = np.mean([[r["offpolicy/frac_truncated"] + r["offpolicy/frac_masked"]
                                  for r in c] for c in curves], 0)  # fmt: skip
                else:
                    y = np.mean([[r[key] for r in c] for c in curves], 0)
                color = {"none": "C0", "truncate": "C1", "mask": "C2"}.get(label, "k")
                ax.plot(np.arange(1, len(y) + 1), y, ls, label=label, lw=1.4, color=color)
            if key == "offpolicy/kl_k3":  # engine and staleness mismatch differ by orders
                ax.set_yscale("log")
            ax.set_title(f"{title}, max_staleness={k}", fontsize=9)
            ax.set_xlabel("PPO step")
        row[0].legend(fontsize=8)
    fig.suptitle(f"PPO, trainer float32, rollouts from alignforge serve in {engine} "
                 "(mean over seeds)")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def exact_kl(n: int = 4, tokens: int = 120) -> dict[str, float]:
    """KL(float32 || engine) per token, exact over the vocabulary, teacher-forced on the first
    ``n`` alpaca answers (chat-templated, first ``tokens`` tokens): the engines' numerics alone,
    one sequence at a time, without sampling or training."""
    import copy

    import torch

    from alignforge.models import load_model, load_tokenizer
    from alignforge.rollout.batch import quantize_int8

    model, tok = load_model("default").eval(), load_tokenizer("default")
    rows = json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())[:n]
    seqs = [tok.apply_chat_template([{"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": r["output"]}],
                                    tokenize=True, return_dict=False)[:tokens] for r in rows]  # fmt: skip
    engines = {"bfloat16": copy.deepcopy(model).to(torch.bfloat16),
               "int8": quantize_int8(copy.deepcopy(model))}  # fmt: skip
    out = {}
    with torch.no_grad():
        for name, engine in engines.items():
            kls = []
            for s in seqs:
                ids = torch.tensor([s])
                p = torch.log_softmax(model(ids).logits[0].float(), -1)
                q = torch.log_softmax(engine(ids).logits[0].float(), -1)
                kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
            out[name] = float(np.mean(kls))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads: trainer and server each")
    ap.add_argument("--plot-only", action="store_true", help="tables and plots from the JSON")
    ap.add_argument("--exact-kl", action="store_true",
                    help="also the engines' exact KL to float32 on fixed answers (~1 min)")  # fmt: skip
    args = ap.parse_args()

    store = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    if not args.plot_only:
        store["command"] = " ".join(["python benchmarks/offpolicy_server.py", *sys.argv[1:]])
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        run_grid(args, store)
    if args.exact_kl:
        store["exact_kl_per_token"] = exact_kl()
        print(f"KL(float32 || engine) per token, teacher-forced: {store['exact_kl_per_token']}")
    by_cell = cells(store)
    store["cells"] = {name: summary(c) for name, c in by_cell.items()}
    RESULTS.write_text(json.dumps(store, indent=1))
    for engine in dict.fromkeys(e for e, _, _ in GRID if e != "float32"):  # the control: dashed
        if any(n.startswith(engine + "/") for n in by_cell):
            plot(by_cell, engine, ROOT / f"docs/img/offpolicy_server_{engine}.png")
    print(table(store["cells"]))


if __name__ == "__main__":
    main()
