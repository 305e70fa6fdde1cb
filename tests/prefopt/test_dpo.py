"""DPO recipe: accumulation invariance, the reference policy, cached reference log-probs, learning."""

import json
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignforge.config import build_config
from alignforge.config.preference import DPOConfig
from alignforge.data.preference import prepare_pairs
from alignforge.recipes import dpo, ref_logps
from alignforge.training import TrainLoop

WORDS = (
    "river stone cloud apple tiger lamp garden piano rocket forest candle mirror ladder "
    "violin desert island bridge castle engine pocket marble feather orange silver window "
    "harbor meadow button ticket pillow jungle canyon glacier compass lantern"
).split()

LAYOUT_PACKED_128 = SimpleNamespace(
    share_prompt=False, padding_free=True, pack_length=128, max_length=64
)


def style_pairs(words, seed=0):
    """Chosen answers in one style ("Yes, gladly: ..."), rejected in another ("No way: ...")."""
    rng = random.Random(seed)
    rows = []
    for w in words:
        other = rng.choice(WORDS)
        rows.append(
            {
                "prompt": f"Tell me about the {w}.",
                "chosen": f"Yes, gladly: the {w} is near the {other}.",
                "rejected": f"No way: the {w} is near the {other}.",
            }
        )
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    train, held = WORDS[:28], WORDS[28:]
    for name, words in (("train", train), ("eval", held)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in style_pairs(words)))
    return str(d / "train.jsonl"), str(d / "eval.jsonl")


def cfg(model, data, out, **kw):
    base = dict(
        stage="dpo",
        model_name_or_path=model,
        dataset=data[0],
        eval_dataset=data[1],
        output_dir=str(out),
        max_length=64,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=4,
        lora_dropout=0.0,
        progress=False,
        report_to="none",
    )
    return build_config(DPOConfig, {**base, **kw})


def first_step(c, tiny_model_dir):
    """Loss, stats and gradients of one optimizer step (the update itself is skipped)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, _ = prepare_pairs([json.loads(x) for x in open(c.dataset)], tok, c.max_length)
    torch.manual_seed(0)  # the same LoRA initialisation for both runs
    model, ref = dpo.build_policy(c.model_name_or_path, c.finetuning_type, lora_dropout=0.0)
    for n, p in model.named_parameters():  # a non-zero adapter, so chosen/rejected differ from ref
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    collate = dpo.make_collate(tok.pad_token_id, c)
    loop = TrainLoop(
        model, dpo.PreferenceObjective(c.beta, c.loss_type, ref_model=ref), pairs, collate, c
    )
    grads = {}

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    loop.optimizer.step = capture
    stats = loop.train_step(loop.step_batches(0))
    return stats, grads


@pytest.mark.parametrize("layout", [dict(padding_free=False), dict(share_prompt=True)])
def test_dpo_step_is_invariant_to_micro_batching(tiny_model_dir, data, tmp_path, layout):
    one = cfg(
        tiny_model_dir,
        data,
        tmp_path / "a",
        per_device_train_batch_size=4,
        max_grad_norm=None,
        **layout,
    )
    two = cfg(tiny_model_dir, data, tmp_path / "b", per_device_train_batch_size=2,
              gradient_accumulation_steps=2, max_grad_norm=None, **layout)  # fmt: skip
    s1, g1 = first_step(one, tiny_model_dir)
    s2, g2 = first_step(two, tiny_model_dir)
    assert abs(s1["loss"] - s2["loss"]) < 1e-6 and abs(s1["loss"] - 0.6931) > 1e-3
    for key in dpo.STATS:
        assert abs(s1[key] - s2[key]) < 1e-5, key
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-7, rtol=1e-4)


def test_adapter_disabled_reference_equals_a_separately_loaded_base(tiny_model_dir, data):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, _ = prepare_pairs([json.loads(x) for x in open(data[0])][:6], tok, 64)
    policy, ref = dpo.build_policy(tiny_model_dir, "lora", lora_dropout=0.0)
    assert ref is None  # no second copy with LoRA
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    batch = dpo.make_collate(tok.pad_token_id, LAYOUT_PACKED_128)(pairs)
    objective = dpo.PreferenceObjective(beta=0.1)
    policy.train()
    ref_logps = objective.reference(policy, batch)
    assert policy.training  # the reference pass leaves the mode as it was
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref_logps, dpo.pair_logps(base, batch)[0], atol=1e-5, rtol=1e-6)
        policy_logps = dpo.pair_logps(policy.eval(), batch)[0]
    assert (policy_logps - ref_logps).abs().max() > 1e-2  # the adapter is on outside the context
    # full fine-tuning: a frozen copy, not the trained module
    full, frozen = dpo.build_policy(tiny_model_dir, "full")
    assert frozen is not full and not any(p.requires_grad for p in frozen.parameters())


def test_cached_reference_logps_equal_fresh_ones_and_are_reused(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    fresh = dpo.run(
        cfg(tiny_model_dir, data, tmp_path / "live", finetuning_type="lora", max_steps=2)
    )
    s1 = dpo.run(cfg(tiny_model_dir, data, tmp_path / "r1", max_steps=2, precompute_ref_logps=True,
                     cache_dir=str(cache)))  # fmt: skip
    assert s1["ref_logps"] == {"train": "computed", "eval": "computed"}
    assert len(list((cache / "ref_logps").glob("*.pt"))) == 2
    # cached reference log-probs give the same training as live reference passes
    for key in ("loss", "rewards/chosen", "rewards/margins"):
        assert abs(s1["last_train"][key] - fresh["last_train"][key]) < 1e-5, key
    assert abs(s1["final_eval"]["loss"] - fresh["final_eval"]["loss"]) < 1e-5
    # the cached values equal a fresh computation with the adapter-off model
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, _ = prepare_pairs([json.loads(x) for x in open(data[0])], tok, 64)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    collate = dpo.make_collate(tok.pad_token_id, LAYOUT_PACKED_128)
    want = dpo.compute_ref_logps(base, None, pairs, collate, 8, "cpu")
    fp32 = dpo.precision_tag("float32", "lora", None)
    path = dpo.ref_cache_path(
        cache, dpo.model_identity(tiny_model_dir), pairs, 64, tok.chat_template, fp32
    )
    torch.testing.assert_close(torch.load(path)["values"], want, atol=1e-5, rtol=1e-6)

    def boom(*a, **k):
        raise AssertionError("reference log-probs recomputed although cached")

    monkeypatch.setattr(dpo, "compute_ref_logps", boom)
    s2 = dpo.run(cfg(tiny_model_dir, data, tmp_path / "r2", max_steps=2, precompute_ref_logps=True,
                     cache_dir=str(cache)))  # fmt: skip
    assert s2["ref_logps"] == {"train": "cache", "eval": "cache"}
    assert abs(s2["last_train"]["loss"] - s1["last_train"]["loss"]) < 1e-6
    # a bf16 run does not reuse the fp32 values: it computes them (and so hits `boom`)
    with pytest.raises(AssertionError, match="recomputed although cached"):
        dpo.run(cfg(tiny_model_dir, data, tmp_path / "r3", max_steps=1, precompute_ref_logps=True,
                    cache_dir=str(cache), dtype="bfloat16"))  # fmt: skip


def test_tiny_model_learns_held_out_preferences(tiny_model_dir, data, tmp_path):
    s = dpo.run(
        cfg(tiny_model_dir, data, tmp_path / "run", finetuning_type="full", max_steps=14,
            per_device_train_batch_size=8, learning_rate=3e-3, eval_steps=7, beta=0.2)
    )  # fmt: skip
    ev = s["final_eval"]
    assert ev["rewards/accuracies"] >= 0.8, ev
    assert ev["rewards/margins"] > 0 and ev["loss"] < 0.69
    # the held-out report comes from the same final evaluation, beside the baselines; here
    # every chosen answer ("Yes, gladly: ...") is the longer one, so length alone scores 100%
    rep, base = s["eval"], s["baselines"]
    assert (
        rep["accuracy"] == pytest.approx(ev["rewards/accuracies"])
        and rep["n_pairs"] == len(WORDS) - 28
    )
    assert base["chosen_longer_share"] == 1.0 and base["longer_answer"]["accuracy"] == 1.0
    assert not rep["vs"]["longer_answer"]["beats"] and rep["when_chosen_shorter"] is None
    assert rep["warnings"][0].startswith(f"only {rep['n_pairs']} pairs")
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(k in rows[0] for k in dpo.STATS)
    assert [r["split"] for r in rows].count("eval") == 2
    for f in ("summary.json", "loss_curve.png", "rewards.png", "final/config.json"):
        assert (tmp_path / "run" / f).exists(), f


def test_reference_cache_key_covers_dtype_quantisation_and_autocast(tiny_model_dir, data):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs, _ = prepare_pairs([json.loads(x) for x in open(data[0])], tok, 64)
    ident = dpo.model_identity(tiny_model_dir)

    def path(dtype="float32", finetuning_type="lora", mixed=None):
        tag = dpo.precision_tag(dtype, finetuning_type, mixed)
        return dpo.ref_cache_path("c", ident, pairs, 64, tok.chat_template, tag)

    fp32 = path()
    variants = [path(dtype="bfloat16"), path(finetuning_type="qlora"), path(mixed="bf16"),
                path(mixed="fp16"), path(finetuning_type="qlora", dtype="bfloat16")]  # fmt: skip
    assert len({fp32, *variants}) == 1 + len(variants)
    # the same weights in the same precision: LoRA and full fine-tuning share the reference
    assert path(finetuning_type="full") == fp32 and path(mixed="no") == fp32


def _cache_values(seed: int, n: int = 300) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def test_concurrent_cache_writers_never_fail_nor_leave_a_partial_file(tmp_path):
    """8 threads write the same key at once, 5 rounds, while a reader keeps loading the file:
    every write succeeds, every read is a complete blob (or no file yet), nothing is left over."""
    import threading

    path = tmp_path / "ref_logps" / "k.pt"
    keys = [f"pair{i}" for i in range(300)]
    candidates = [_cache_values(s) for s in range(8)]
    errors, reads, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            if path.exists():
                got = ref_logps.read_ref_cache(path, keys)
                reads.append(got is not None and any(torch.equal(got, c) for c in candidates))

    def writer(i, barrier):
        try:
            barrier.wait()
            ref_logps.write_ref_cache(path, keys, candidates[i])
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    watcher = threading.Thread(target=reader)
    watcher.start()
    for _ in range(5):
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=writer, args=(i, barrier)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert reads and all(reads)
    final = ref_logps.read_ref_cache(path, keys)
    assert final is not None and any(torch.equal(final, c) for c in candidates)
    assert [p.name for p in path.parent.iterdir()] == ["k.pt"]  # no temporary file left


def test_a_damaged_or_foreign_cache_is_recomputed_not_trusted(tmp_path):
    path = tmp_path / "ref_logps" / "k.pt"
    path.parent.mkdir(parents=True)
    pairs = [dpo.PreferencePair([1], [2, 3], [4]), dpo.PreferencePair([1], [5], [6, 7])]
    keys = [p.key() for p in pairs]
    path.write_bytes(b"PK\x03\x04 truncated")
    assert ref_logps.read_ref_cache(path, keys) is None
    want = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    assert ref_logps.attach_ref_logps(pairs, path, lambda: want) == "computed"
    assert [p.ref for p in pairs] == [(-1.0, -2.0), (-3.0, -4.0)]
    assert ref_logps.read_ref_cache(path, keys[::-1]) is None  # other pairs: not theirs
    assert ref_logps.attach_ref_logps(pairs, path, lambda: 1 / 0) == "cache"


@pytest.mark.parametrize("precompute", [False, True])
def test_models_used_outside_the_loop_are_placed_on_the_run_device(
    tiny_model_dir, data, tmp_path, monkeypatch, precompute
):
    """Full fine-tuning: the frozen reference goes through place_frozen; with pre-computation the
    policy is moved before it scores anything and every reference batch goes through to_device,
    all to ``acc.device`` (on a GPU a CPU-held model there would crash)."""
    events = []

    def devices(module):
        return {p.device.type for p in module.parameters()}

    def spy(name, real):
        def wrapped(acc, module):
            out = real(acc, module)
            if module is not None:
                events.append((name, acc.device.type, devices(out), out))
            return out

        return wrapped

    real_to_device = ref_logps.to_device

    def to_device(batch, device):
        events.append(("batch", torch.device(device).type, None, None))
        return real_to_device(batch, device)

    monkeypatch.setattr(dpo, "place_frozen", spy("frozen", dpo.place_frozen))
    monkeypatch.setattr(dpo, "place_policy", spy("policy", dpo.place_policy))
    monkeypatch.setattr(ref_logps, "to_device", to_device)  # reference batches
    seen = {}
    real_objective = dpo.PreferenceObjective

    def objective(*a, **k):
        seen["objective"] = real_objective(*a, **k)
        return seen["objective"]

    monkeypatch.setattr(dpo, "PreferenceObjective", objective)
    s = dpo.run(cfg(tiny_model_dir, data, tmp_path / "run", finetuning_type="full", max_steps=1,
                    precompute_ref_logps=precompute, cache_dir=str(tmp_path / "c")))  # fmt: skip
    names = [e[0] for e in events]
    frozen = events[names.index("frozen")]
    assert frozen[2] == {frozen[1]} and not any(p.requires_grad for p in frozen[3].parameters())
    if precompute:
        assert s["ref_logps"] == {"train": "computed", "eval": "computed"}
        assert names == ["frozen", "policy"] + ["batch"] * (4 + 1)  # 28 + 8 pairs, 8 a batch
        policy = events[1]
        assert policy[2] == {policy[1]} and all(e[1] == policy[1] for e in events[2:])
        assert seen["objective"].ref_model is None  # the batches carry the reference
    else:
        assert names == ["frozen"] and seen["objective"].ref_model is frozen[3]
