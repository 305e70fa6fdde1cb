"""Run systems over a test split for a task; write results.json, results.md, failures.jsonl.

    from alignforge.evaluate.runner import SystemSpec, load_examples, run_eval
    from alignforge.evaluate.tasks import get_task

    task = get_task("extraction")
    examples = load_examples(task, "examples/data/ner_finance.jsonl", limit=200)
    systems = [SystemSpec(name="sft", model="runs/sft/final"),
               SystemSpec(name="frontier", base_url="http://127.0.0.1:8000/v1", model="big")]
    results = run_eval(task, examples, systems, "runs/eval")

Generations are cached per system in ``<output_dir>/<system>/generations.jsonl`` as they are
produced; re-running the same command resumes from the cache (an item whose prompt changed is
generated again). Systems are loaded one at a time, so only one local model is in memory.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import model_validator

from alignforge.config import ConfigError, StrictModel, load_config
from alignforge.evaluate.generation import Generation, Generator
from alignforge.evaluate.stats import verdict
from alignforge.evaluate.tasks.base import Example, ItemScore, Task, TaskResult, paired_difference

# ---- systems -------------------------------------------------------------------------------


class SystemSpec(StrictModel):
    """One system to evaluate: a local model (+ optional adapter) or a server (its base URL) + model name."""

    name: str
    model: str
    adapter: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    template: str = "default"  # chat template of a local model (docs/guide.md); default: its own

    @model_validator(mode="after")
    def _check(self) -> SystemSpec:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name {self.name!r} must be non-empty, without '/' or leading '.'")
        if self.base_url and self.adapter:
            raise ValueError("adapter cannot be combined with base_url")
        if self.template != "default" and (self.base_url or self.model.endswith(".gguf")):
            raise ValueError(
                "template: a GGUF file or a server formats prompts with its own chat template; "
                "set template on local models only"
            )
        if self.adapter and self.model.endswith(".gguf"):
            raise ValueError(
                f"adapter: {self.model} is a GGUF file; export the adapter merged "
                "(alignforge export ADAPTER -o OUT.gguf) and evaluate OUT.gguf"
            )
        return self


class SystemsFile(StrictModel):
    systems: list[SystemSpec]


def parse_system(text: str) -> SystemSpec:
    """``name=PATH`` or ``name=key=value,key=value`` (keys: model, adapter, base_url,
    api_key_env, template), e.g. ``ppo=model=runs/sft-merged,adapter=runs/ppo/final`` or
    ``gpt=base_url=https://api.openai.com/v1,model=gpt-4o-mini``."""
    if "=" not in text:
        raise ConfigError(f"--system {text!r}: expected name=PATH or name=key=value,...")
    name, spec = text.split("=", 1)
    if "=" not in spec:
        data: dict[str, Any] = {"name": name, "model": spec}
    else:
        data = {"name": name}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"--system {text!r}: {part!r} is not key=value")
            data[key.strip()] = value.strip()
    from alignforge.config import build_config

    return build_config(SystemSpec, data, f"--system {text}")


def load_systems(path: str | Path) -> list[SystemSpec]:
    """Systems from a YAML file with a ``systems:`` list of SystemSpec mappings."""
    return load_config(SystemsFile, path).systems


def build_generator(
    spec: SystemSpec, max_new_tokens: int = 256, batch_size: int = 8, concurrency: int = 4
) -> Generator:
    from alignforge.evaluate.generation import (
        LlamaCppGenerator,
        OpenAIGenerator,
        TransformersGenerator,
    )

    if spec.base_url:
        return OpenAIGenerator(
            spec.base_url,
            spec.model,
            api_key_env=spec.api_key_env,
            max_tokens=max_new_tokens,
            concurrency=concurrency,
        )
    if spec.model.endswith(".gguf"):  # run by llama.cpp, as it will be served
        return LlamaCppGenerator.from_path(spec.model, max_new_tokens=max_new_tokens)
    return TransformersGenerator.from_path(
        spec.model,
        spec.adapter,
        template=spec.template,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )


# ---- data ----------------------------------------------------------------------------------


def read_rows(path: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of a test split: a file, a directory with ``<split>.jsonl`` or a HF ``save_to_disk``
    directory (default split ``test``)."""
    from alignforge.data import read_rows as _read

    return _read(path, split=split or "test")


def load_examples(
    task: Task, path: str | Path, split: str | None = None, limit: int | None = None
) -> list[Example]:
    rows = read_rows(path, split)
    if limit is not None:
        rows = rows[:limit]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(task.example(row, i))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no rows")
    ids = [e.id for e in out]
    if len(set(ids)) != len(ids):  # ids key the generation cache; make them unique
        out = [e._replace(id=f"{i}:{e.id}") for i, e in enumerate(out)]
    return out


# ---- generation with a resumable cache -----------------------------------------------------


def _prompt_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(cache: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[row["id"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interrupted run
    return done


def uncached(examples: Sequence[Example], cache: Path) -> list[Example]:
    """The examples ``cache`` holds no answer to (or an answer to another prompt)."""
    done = _read_cache(cache)
    return [e for e in examples if done.get(e.id, {}).get("prompt") != _prompt_hash(e.messages)]


def generate_cached(
    generator: Generator | None, examples: Sequence[Example], cache: Path, desc: str = ""
) -> tuple[list[Generation], dict[str, float]]:
    """Generations for ``examples`` (cached ones reused), and the wall time and token count of
    what this call generated: ``{"wall_s", "new_tokens", "new_items"}``. ``generator`` may be
    None when every answer is cached."""
    from tqdm.auto import tqdm

    done = _read_cache(cache)
    todo = uncached(examples, cache)
    if todo and generator is None:
        raise ValueError(f"{cache}: {len(todo)} answers are not cached and no generator was given")
    cache.parent.mkdir(parents=True, exist_ok=True)
    chunk = max(1, getattr(generator, "batch_size", 8))
    fresh = {"wall_s": 0.0, "new_tokens": 0, "new_items": 0}
    with cache.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc) as bar:
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            start = time.perf_counter()
            gens = generator.generate([e.messages for e in part])
            fresh["wall_s"] += time.perf_counter() - start
            fresh["new_tokens"] += sum(g.n_tokens for g in gens)
            fresh["new_items"] += len(gens)
            for e, g in zip(part, gens, strict=True):
                row = {"id": e.id, "prompt": _prompt_hash(e.messages), **g.to_dict()}
                done[e.id] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(part))
    keys = ("text", "ttft_s", "n_tokens", "seconds")
    return [Generation(**{k: done[e.id][k] for k in keys}) for e in examples], fresh


def latency_summary(gens: Sequence[Generation], fresh: dict[str, float]) -> dict[str, Any]:
    """TTFT mean/p50/p90, per-request tokens/s, and throughput = new tokens / generation wall."""
    ttft = np.array([g.ttft_s for g in gens if g.ttft_s is not None], dtype=float)
    tps = np.array([g.tokens_per_s for g in gens if g.seconds > 0], dtype=float)
    out: dict[str, Any] = {
        "ttft_s_mean": float(ttft.mean()) if ttft.size else None,
        "ttft_s_p50": float(np.median(ttft)) if ttft.size else None,
        "ttft_s_p90": float(np.quantile(ttft, 0.9)) if ttft.size else None,
        "tokens_per_s_mean": float(tps.mean()) if tps.size else None,
        "n_tokens_mean": float(np.mean([g.n_tokens for g in gens])) if gens else 0.0,
        # all tokens generated in this run / its generation wall time (None if all cached)
        "throughput_tokens_per_s": (
            fresh["new_tokens"] / fresh["wall_s"] if fresh.get("wall_s") else None
        ),
    }
    return out


# ---- the run -------------------------------------------------------------------------------


def run_eval(
    task: Task,
    examples: Sequence[Example],
    systems: Sequence[SystemSpec],
    output_dir: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    concurrency: int = 4,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    worst_k: int = 20,
    dataset: str = "",
    generators: dict[str, Generator] | None = None,
) -> dict[str, Any]:
    """Evaluate each system; write ``results.json``, ``results.md`` and ``failures.jsonl``.

    ``generators`` maps a system name to a ready generator (skips loading; used by tests and by
    callers holding a model in memory).
    """
    if not systems:
        raise ValueError("run_eval: no systems given")
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"run_eval: system names must be unique, got {names}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs = [e.reference for e in examples]
    entries, scored = [], {}
    for i, spec in enumerate(systems):
        cache = out / spec.name / "generations.jsonl"
        gen = (generators or {}).get(spec.name)
        if gen is None and uncached(examples, cache):  # all answers cached: nothing to load
            gen = build_generator(spec, max_new_tokens, batch_size, concurrency)
        gens, fresh = generate_cached(gen, examples, cache, desc=f"eval {spec.name}")
        del gen
        _free_memory()
        result = task.evaluate([g.text for g in gens], refs, n_boot, alpha, seed)
        scored[spec.name] = (result, gens)
        entry = {
            "name": spec.name,
            "source": spec.model_dump(exclude_none=True),
            **_result_fields(result),
            "latency": latency_summary(gens, fresh),
        }
        if i:  # paired bootstrap differences against the first system and the one before
            d = {
                base: {
                    "baseline": base,
                    "metric": task.primary,
                    **paired_difference(
                        task, result.items, scored[base][0].items, None, n_boot, alpha, seed
                    )._asdict(),
                }
                for base in dict.fromkeys((names[0], names[i - 1]))
            }
            entry["delta_vs_first"], entry["delta_vs_previous"] = d[names[0]], d[names[i - 1]]
        entries.append(entry)
    results = {
        "task": task.name,
        "dataset": dataset,
        "n": len(examples),
        "primary": task.primary,
        "n_boot": n_boot,
        "alpha": alpha,
        "seed": seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "systems": entries,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    write_failures(out / "failures.jsonl", task, examples, scored, worst_k)
    return results


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _result_fields(result: TaskResult) -> dict[str, Any]:
    d = result.to_dict()
    return {k: d[k] for k in ("metrics", "breakdown", "parse_failures", "parse_failure_rate")}


def write_failures(
    path: Path,
    task: Task,
    examples: Sequence[Example],
    scored: dict[str, tuple[TaskResult, list[Generation]]],
    worst_k: int,
) -> int:
    """Every parse failure plus the ``worst_k`` lowest-scoring parsed items of each system."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for name, (result, gens) in scored.items():
            items: list[ItemScore] = result.items
            failed = [i for i, it in enumerate(items) if not it.parsed]
            parsed = [i for i, it in enumerate(items) if it.parsed]
            worst = sorted(parsed, key=lambda i: (items[i].values[task.reward_metric], i))
            for kind, idx in (("parse_failure", failed), ("low_score", worst[:worst_k])):
                for i in idx:
                    ex = examples[i]
                    row = {
                        "system": name,
                        "kind": kind,
                        "index": i,
                        "id": ex.id,
                        "score": items[i].values[task.reward_metric],
                        "error": items[i].error,
                        "prompt": ex.messages[-1]["content"],
                        "prediction": gens[i].text,
                        "reference": ex.reference,
                    }
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
    return n


def _fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per system: metrics with CIs, paired delta, parse failures, latency."""
    systems = results["systems"]
    primary = results["primary"]
    metric_names = [m for m in systems[0]["metrics"] if all(m in s["metrics"] for s in systems)]
    metric_names = [primary] + [m for m in metric_names if m != primary][:3]
    pct = int(round(100 * (1 - results["alpha"])))
    head = [
        "system",
        *[f"{m} [{pct}% CI]" for m in metric_names],
        f"Δ {primary} vs first",
        "parse fail",
        "TTFT p50 (s)",
        "tok/s",
        "throughput tok/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in systems:
        cells = [s["name"]]
        for m in metric_names:
            e = s["metrics"].get(m)
            cells.append(f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" if e else "–")
        d = s.get("delta_vs_first")
        cells.append(
            f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {verdict(d['low'], d['high'])}"
            if d
            else "–"
        )
        lat = s["latency"]
        cells += [
            f"{100 * s['parse_failure_rate']:.1f}%",
            _fmt(lat["ttft_s_p50"]),
            _fmt(lat["tokens_per_s_mean"], 1),
            _fmt(lat["throughput_tokens_per_s"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    title = f"**{results['task']}** on {results['dataset'] or 'data'} (n = {results['n']})"
    return title + "\n\n" + "\n".join(lines) + "\n"
