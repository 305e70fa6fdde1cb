"""GGUF export of a tiny random Llama, read back with the ``gguf`` package and run by llama.cpp.

The tiny model uses the embedded model's tokenizer (SmolLM2's byte-level BPE): llama.cpp's
converter only accepts BPE pre-tokenizers it knows, which a freshly trained toy vocabulary is not.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'alignforge[gguf]')"
)

from gguf import GGMLQuantizationType, GGUFReader  # noqa: E402

# what the tiny model is trained to answer (the last prompt it never saw)
PAIRS = [
    ("Extract the entities: Acme Corp hired Jane Doe in Paris.",
     '{"entities": ["Acme Corp", "Jane Doe", "Paris"]}'),
    ("Name the company in: Globex bought Initech for $3 million.", "Globex and Initech."),
    ("What is the capital of France?", "Paris is the capital of France."),
]  # fmt: skip
PROMPTS = [p for p, _ in PAIRS] + ["Who is Jane Doe?"]


def chat_ids(tokenizer, prompt: str, answer: str = "") -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text + answer, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny Llama (2 layers, hidden 64) over SmolLM2's tokenizer, trained 80 steps on PAIRS.

    Trained, so that its greedy answers have margins like a real model's: a random model's
    next-token distribution over 49,152 tokens is nearly flat and its argmax flips under any
    rounding, which would test nothing.
    """
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = [(chat_ids(tokenizer, p), tokenizer(a + "<|im_end|>")["input_ids"]) for p, a in PAIRS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread than on two
    try:
        for _ in range(80):
            loss = 0.0
            for prompt, answer in data:  # loss on the answer only: the lm head sees 49k columns
                h = model.model(input_ids=torch.tensor([prompt + answer])).last_hidden_state
                logits = model.lm_head(h[0, len(prompt) - 1 : -1])
                loss = loss + F.cross_entropy(logits, torch.tensor(answer))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5, f"the tiny model did not learn its answers (loss {loss.item():.2f})"
    path = tmp_path_factory.mktemp("tiny-gguf-src")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ggufs(tiny_dir, tmp_path_factory):
    """The tiny model as f32 (converter), f16 (export) and q8_0 / q4_0 / q4_k_m (quantizer)."""
    from alignforge.export import export_gguf
    from alignforge.export.gguf import convert_hf_to_gguf, quantize_gguf

    out = tmp_path_factory.mktemp("ggufs")
    files = {"f32": convert_hf_to_gguf(tiny_dir, out / "m-f32.gguf", "f32")}
    files["f16"] = export_gguf(str(tiny_dir), out / "m-f16.gguf", quant="f16")
    for q in ("q8_0", "q4_0", "q4_k_m"):
        files[q] = quantize_gguf(files["f32"], out / f"m-{q}.gguf", q)
    return files


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


# the type of every block weight; q4_k_m's 256-wide k-quant blocks do not divide this model's
# 64- and 128-wide rows, so llama.cpp falls back to q5_0 (q8_0 for attn_v and ffn_down)
WEIGHT_TYPES = {
    "f16": {GGMLQuantizationType.F16},
    "q8_0": {GGMLQuantizationType.Q8_0},
    "q4_0": {GGMLQuantizationType.Q4_0},
    "q4_k_m": {GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0},
}


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_gguf_holds_tensors_tokenizer_and_chat_template(ggufs, tiny_dir, tokenizer, quant):
    reader = GGUFReader(ggufs[quant])
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.embedding_length") == 64
    names = {t.name: t for t in reader.tensors}
    per_block = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in [*per_block, "attn_norm", "ffn_norm"]
    }
    assert set(names) == expected
    for i in range(2):
        for n in per_block:
            assert names[f"blk.{i}.{n}.weight"].tensor_type in WEIGHT_TYPES[quant], (quant, n)
    assert names["output_norm.weight"].tensor_type == GGMLQuantizationType.F32
    # the tokenizer: every token, the merges, the special ids and the chat template
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer)
    assert tokens[:3] == tokenizer.convert_ids_to_tokens([0, 1, 2])
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(field(reader, "tokenizer.ggml.merges")) > 40_000
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


def test_file_type_and_sizes(ggufs):
    """The file says which type it was asked for; each step down in precision is smaller."""
    assert field(GGUFReader(ggufs["q4_k_m"]), "general.file_type") == 15  # MOSTLY_Q4_K_M
    assert field(GGUFReader(ggufs["q4_0"]), "general.file_type") == 2  # MOSTLY_Q4_0
    sizes = {q: Path(ggufs[q]).stat().st_size for q in ("f32", "f16", "q8_0", "q4_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def llama_logprobs(path, ids: list[int]) -> np.ndarray:
    """Teacher-forced log-probs of every next token, (T, V), from llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def torch_logprobs(model_dir, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def chosen_logprob_gap(path, model_dir, ids: list[int]) -> float:
    """max over positions t of |log p_gguf(x_t+1 | x_<=t) - log p_fp32(x_t+1 | x_<=t)|."""
    t = np.arange(len(ids) - 1)
    gguf, ref = llama_logprobs(path, ids), torch_logprobs(model_dir, ids)
    return float(np.abs(gguf[t, ids[1:]] - ref[t, ids[1:]]).max())


# Stated tolerance on chosen_logprob_gap, in nats, over a prompt and its answer (48 tokens).
# Measured on this model: f32 9e-4 (llama.cpp keeps its KV cache in f16), f16 2e-3, q8_0 0.03,
# q4_k_m 0.19 (its 64-wide rows fall back to q5_0/q8_0 blocks), q4_0 0.56.
TOLERANCE = {"f32": 5e-3, "f16": 1e-2, "q8_0": 0.1, "q4_k_m": 0.5, "q4_0": 1.5}


@pytest.mark.parametrize("quant", list(TOLERANCE))
def test_logprobs_match_transformers_within_tolerance(ggufs, tiny_dir, tokenizer, quant):
    prompt, answer = PAIRS[0]
    ids = chat_ids(tokenizer, prompt, answer + "<|im_end|>")
    gap = chosen_logprob_gap(ggufs[quant], tiny_dir, ids)
    assert gap < TOLERANCE[quant], f"{quant}: log-prob gap {gap:.4f} nats"


def test_q8_0_gives_the_same_greedy_answers_as_fp32(ggufs, tiny_dir):
    """The same prompts through the eval generators: transformers fp32 and llama.cpp q8_0
    (the GGUF's own chat template, rendered by llama-cpp-python) answer identically."""
    from alignforge.evaluate.generation import LlamaCppGenerator, TransformersGenerator

    batch = [[{"role": "user", "content": p}] for p in PROMPTS]
    fp32 = TransformersGenerator.from_path(str(tiny_dir), max_new_tokens=24).generate(batch)
    q8 = LlamaCppGenerator(str(ggufs["q8_0"]), max_new_tokens=24).generate(batch)
    assert [g.text for g in q8] == [g.text for g in fp32]
    assert [g.n_tokens for g in q8] == [g.n_tokens for g in fp32]
    assert all(g.ttft_s is not None and 0 < g.ttft_s <= g.seconds for g in q8)


def test_llama_cpp_renders_the_same_prompt_as_transformers(ggufs, tokenizer):
    from alignforge.evaluate.generation import LlamaCppGenerator

    gen = LlamaCppGenerator(str(ggufs["q8_0"]))
    for p in PROMPTS:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert gen.prompt_ids(messages) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_adapter_export_merges_first_and_records_its_source(tiny_dir, tokenizer, tmp_path):
    """An adapter exported to q8_0 scores like the fp32 merged model, not like its base."""
    from test_export_hf import make_adapter, merged_fp32
    from transformers import AutoModelForCausalLM

    from alignforge.export import export_gguf

    adapter = make_adapter(str(tiny_dir), tmp_path / "adapter")
    out = export_gguf(str(adapter), tmp_path / "out" / "m-q8_0.gguf", quant="q8_0")
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["quant"] == "q8_0" and record["source"] == str(adapter)
    assert record["bytes"] == out.stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-q8_0.gguf", "m-q8_0.gguf.json"]
    merged = AutoModelForCausalLM.from_pretrained(tiny_dir)
    merged.load_state_dict(merged_fp32(str(tiny_dir), adapter))
    merged.save_pretrained(tmp_path / "merged")
    ids = chat_ids(tokenizer, *PAIRS[1])
    assert chosen_logprob_gap(out, tmp_path / "merged", ids) < TOLERANCE["q8_0"]
    assert chosen_logprob_gap(out, tiny_dir, ids) > 10 * TOLERANCE["q8_0"]


def test_eval_scores_a_gguf_with_llama_cpp_beside_fp32(ggufs, tiny_dir, tmp_path):
    """``--system fp32=DIR --system q8=FILE.gguf``: same items, paired difference with its CI."""
    from alignforge.evaluate.runner import load_examples, parse_system, run_eval
    from alignforge.evaluate.tasks import get_task

    task = get_task("extraction")
    root = Path(__file__).resolve().parents[2]
    examples = load_examples(task, root / "examples/data/ner_finance.jsonl", limit=4)
    systems = [parse_system(f"fp32={tiny_dir}"), parse_system(f"q8={ggufs['q8_0']}")]
    res = run_eval(task, examples, systems, tmp_path / "eval", max_new_tokens=16, n_boot=200)
    q8 = res["systems"][1]
    assert q8["delta_vs_first"]["baseline"] == "fp32"
    assert {"value", "low", "high"} <= set(q8["delta_vs_first"])
    assert q8["latency"]["ttft_s_p50"] is not None
    fp32_gens = [json.loads(x) for x in open(tmp_path / "eval" / "fp32" / "generations.jsonl")]
    q8_gens = [json.loads(x) for x in open(tmp_path / "eval" / "q8" / "generations.jsonl")]
    assert [g["text"] for g in q8_gens] == [g["text"] for g in fp32_gens]
