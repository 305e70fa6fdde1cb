"""Every attention backend the config allows keeps packed examples apart, or is refused clearly."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM

from alignforge.config import ConfigError, build_config
from alignforge.config.preference import DPOConfig, SPINConfig
from alignforge.config.stages import SFTConfig
from alignforge.data import Tokenized, collate_packed
from alignforge.data.preference import PreferencePair, collate_pairs
from alignforge.data.templating import IGNORE
from alignforge.models import ModelLoadError, attention, load_model
from alignforge.models.scoring import target_token_logps
from alignforge.recipes.common import build_trainable_model
from alignforge.recipes.sft import CausalLMObjective, make_units

LAYOUTS = {"padded": (False, False), "padding_free": (False, True), "packed": (True, True)}


def examples(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE] * 2 + ids[2:]))
    return out


def sft_losses(model, ex, layouts=tuple(LAYOUTS), max_length=16):
    """Per-token SFT loss of the same examples in each batch layout of the SFT recipe."""
    objective, out = CausalLMObjective(), {}
    for name in layouts:
        packing, padding_free = LAYOUTS[name]
        cfg = SimpleNamespace(packing=packing, padding_free=padding_free, max_length=max_length)
        units, collate = make_units(ex, cfg, pad_id=0)
        batch = collate(units)
        if name != "padded":
            assert batch["input_ids"].shape[0] < len(ex)  # several examples share a row
            assert "attention_mask" not in batch  # positions alone mark the examples
        with torch.no_grad():
            loss, _ = objective(model, batch)
        out[name] = float(loss) / objective.count(batch)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_sft_loss_equals_padded(tiny_model_dir, attn):
    model = load_model(tiny_model_dir, attn_implementation=attn).eval()
    assert model.config._attn_implementation == attn
    ex = examples([7, 11, 4, 9, 3, 12], model.config.vocab_size, seed=1)
    losses = sft_losses(model, ex)
    assert abs(losses["padding_free"] - losses["padded"]) < 1e-5
    assert abs(losses["packed"] - losses["padded"]) < 1e-5


def test_build_trainable_model_loads_the_configured_backend(tiny_model_dir, tmp_path):
    cfg = build_config(
        SFTConfig,
        dict(model_name_or_path=tiny_model_dir, dataset="d", output_dir=str(tmp_path), attn_implementation="eager"),
    )  # fmt: skip
    assert build_trainable_model(cfg).config._attn_implementation == "eager"


def test_a_boolean_mask_misleads_eager_attention_and_the_built_one_does_not(tiny_model_dir):
    """Eager attention adds the mask to its scores: True/False become +1/+0 and the examples of a
    row see each other. The mask built for eager is 0 / most-negative instead."""
    model = load_model(tiny_model_dir, attn_implementation="eager").eval()
    ex = examples([7, 11], model.config.vocab_size)
    batch = collate_packed([ex], pad_id=0)
    ids, pos = batch["input_ids"], batch["position_ids"]
    seg = batch["segment_ids"]
    boolean = (seg[:, :, None] == seg[:, None, :]) & torch.tril(
        torch.ones(18, 18, dtype=torch.bool)
    )
    inputs = attention.attention_inputs(model, ids, position_ids=pos)
    mask = inputs.kwargs["attention_mask"]
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 18, 18)
    assert mask[0, 0, 10, 3] == torch.finfo(torch.float32).min and mask[0, 0, 10, 8] == 0
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ex[1].input_ids])).logits[0]
        wrong = model(input_ids=ids, attention_mask=boolean[:, None], position_ids=pos).logits
        right = model(input_ids=inputs.input_ids, use_cache=False, **inputs.kwargs).logits
    assert (wrong[0, 7:] - alone).abs().max() > 1e-3
    torch.testing.assert_close(right[0, 7:], alone, atol=1e-5, rtol=1e-5)


def pair_logps(model, batch):
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    lp = target_token_logps(
        model, batch["input_ids"], batch["tgt_row"], batch["tgt_pred"], batch["tgt_id"], **kwargs
    )
    return torch.zeros(2 * batch["n_pairs"]).index_add(0, batch["tgt_seq"], lp)


def some_pairs(vocab):
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [PreferencePair(ids(p), ids(c), ids(r)) for p, c, r in [(5, 4, 6), (3, 7, 2), (6, 3, 3)]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_shared_prompt_pairs_score_as_padded_ones(tiny_model_dir, attn):
    model = load_model(tiny_model_dir, attn_implementation=attn).eval()
    pairs = some_pairs(model.config.vocab_size)
    with torch.no_grad():
        want = pair_logps(model, collate_pairs(pairs, 0, layout="padded"))
        for layout in ("packed", "shared"):
            batch = collate_pairs(pairs, 0, layout=layout, pack_length=64)
            assert batch["input_ids"].shape[0] < 2 * len(pairs)
            torch.testing.assert_close(pair_logps(model, batch), want, atol=1e-5, rtol=1e-5)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Stands in for flash attention's varlen kernel (which needs CUDA): causal attention within
    each ``cu_seq_lens`` span of one row, and no mask."""
    assert attention_mask is None and query.shape[0] == 1, "flash gets one row and no 4-D mask"
    cu = kw["cu_seq_lens_q"].tolist()
    assert kw["max_length_q"] == max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    spans = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
        )
        for a, b in zip(cu[:-1], cu[1:], strict=True)
    ]
    return torch.cat(spans, dim=2).transpose(1, 2).contiguous(), None


def test_flash_attention_runs_packed_rows_as_varlen_sequences(tiny_model_dir, monkeypatch):
    """Under flash attention a packed batch becomes one row plus its sequence boundaries
    (``cu_seq_lens``), which the kernels read; no T x T mask is built."""
    model = load_model(tiny_model_dir).eval()
    ex = examples([7, 11, 4, 9, 3, 12], model.config.vocab_size, seed=2)
    padded = sft_losses(model, ex, ["padded"])["padded"]
    AttentionInterface.register("varlen_emulation", varlen_attention)
    model.set_attn_implementation("varlen_emulation")
    monkeypatch.setattr(attention, "backend", lambda m: "flash")
    losses = sft_losses(model, ex, ["padding_free", "packed"])
    assert abs(losses["padding_free"] - padded) < 1e-5
    assert abs(losses["packed"] - padded) < 1e-5
    with pytest.raises(ConfigError, match="share_prompt: false"):
        pair_logps(model, collate_pairs(some_pairs(model.config.vocab_size), 0, layout="shared"))


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_backends_this_machine_cannot_run_are_refused_before_loading(tiny_model_dir, attn):
    with pytest.raises(ConfigError, match=f"attn_implementation: {attn} needs a"):
        load_model(tiny_model_dir, attn_implementation=attn)
    with pytest.raises(ConfigError, match="is not one of sdpa, eager, flash_attention_2"):
        load_model(tiny_model_dir, attn_implementation="flash")


def test_flex_attention_sees_packed_examples_apart(tiny_model_dir):
    """FlexAttention runs forward-only on CPU: a packed batch gets a BlockMask of its examples."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="flex_attention"
    )
    model.eval().requires_grad_(False)
    ex = examples([7, 11, 4, 9, 3, 12], model.config.vocab_size, seed=3)
    padded = sft_losses(load_model(tiny_model_dir).eval(), ex, ["padded"])["padded"]
    assert abs(sft_losses(model, ex, ["padding_free"])["padding_free"] - padded) < 1e-5


def test_config_refuses_combinations_a_backend_cannot_run():
    base = dict(model_name_or_path="m", dataset="d", output_dir="o")
    with pytest.raises(ConfigError, match="attn_implementation: flash_attention_2 computes in"):
        build_config(SFTConfig, {**base, "attn_implementation": "flash_attention_2"})
    build_config(SFTConfig, {**base, "attn_implementation": "flash_attention_2", "bf16": True})
    build_config(
        SFTConfig, {**base, "attn_implementation": "flash_attention_3", "dtype": "bfloat16"}
    )
    flash_shared = {**base, "attn_implementation": "flash_attention_2", "dtype": "bfloat16",
                    "share_prompt": True}  # fmt: skip
    for cls in (DPOConfig, SPINConfig):
        with pytest.raises(ConfigError, match="share_prompt: the shared layout needs a custom"):
            build_config(cls, flash_shared)
    with pytest.raises(ConfigError, match="'sdpa', 'eager', 'flash_attention_2'"):
        build_config(SFTConfig, {**base, "attn_implementation": "flash"})


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("gemma2")
    Gemma2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_gemma2_trains_under_eager_attention(gemma2_dir):
    """Gemma 2 has no sdpa path (its attention logits are soft-capped): the default is refused
    with a pointer to the option, and eager attention scores packed batches like padded ones."""
    with pytest.raises(
        ModelLoadError, match="attn_implementation=sdpa: this model may need another"
    ):
        load_model(gemma2_dir)
    model = load_model(gemma2_dir, attn_implementation="eager").eval()
    losses = sft_losses(model, examples([7, 11, 4, 9, 3, 12], 120, seed=4))
    assert abs(losses["padding_free"] - losses["padded"]) < 1e-5
    assert abs(losses["packed"] - losses["padded"]) < 1e-5
    model.config.sliding_window = 8  # rows longer than the window: a 4-D mask would drop it
    with pytest.raises(ConfigError, match="sliding window"):
        sft_losses(model, examples([7, 11, 4], 120), ["padding_free"])
