import pytest
import torch
from transformers import AutoModelForCausalLM

from alignforge.data import Tokenized, collate_packed, collate_padded, pack
from alignforge.data.templating import IGNORE
from alignforge.models.attention import attention_inputs


def examples(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(Tokenized(ids, [IGNORE] * 2 + ids[2:]))
    return out


def test_pack_places_every_example_once_within_budget():
    ex = examples([5, 9, 3, 12, 7, 1, 16], 50)
    rows = pack(ex, 16)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(ex)))
    assert all(sum(len(ex[i]) for i in row) <= 16 for row in rows)
    assert len(rows) == 4  # 53 tokens need at least 4 rows of 16


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(tiny_model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    ex = examples([7, 11, 4], model.config.vocab_size)
    batch = collate_packed([ex[:2], ex[2:]], pad_id=0)  # two rows: [7+11], [4 + padding]
    inputs = attention_inputs(model, batch["input_ids"], position_ids=batch["position_ids"])
    with torch.no_grad():
        packed = model(input_ids=inputs.input_ids, use_cache=False, **inputs.kwargs).logits
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in ex]
    torch.testing.assert_close(packed[0, :7], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 7:18], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :4], alone[2], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(packed).all()  # padding rows stay finite


def test_position_ids_alone_do_not_isolate_examples(tiny_model_dir):
    """Why packed batches go through ``attention_inputs``: handed straight to a model with its KV
    cache on, restarting position_ids leak attention across examples."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    ex = examples([7, 11], model.config.vocab_size)
    batch = collate_packed([ex], pad_id=0)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=torch.tensor([ex[1].input_ids])).logits[0]
    assert (leaky[0, 7:18] - alone).abs().max() > 1e-3


def test_packed_labels_never_cross_a_boundary():
    ex = examples([4, 4], 50)
    ex = [Tokenized(e.input_ids, list(e.input_ids)) for e in ex]  # every token a label
    batch = collate_packed([ex], pad_id=0)
    assert (
        batch["labels"][0, 0] == IGNORE and batch["labels"][0, 4] == IGNORE
    )  # first token of each
    padded = collate_padded(ex, pad_id=0)
    assert (padded["labels"][:, 0] == IGNORE).all()


def test_packed_batch_marks_segments_and_counts_real_tokens_only():
    from alignforge.recipes.sft import CausalLMObjective

    ex = examples([3, 2, 4], 50)
    batch = collate_packed([ex[:2], ex[2:]], pad_id=0)  # rows [3+2], [4 + 1 padding]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert CausalLMObjective().tokens(batch) == 9  # 3 + 2 + 4; the padding slot is not counted
    padded = collate_padded(ex, pad_id=0)  # 3 rows of width 4
    assert CausalLMObjective().tokens(padded) == 9


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sft_loss_and_gradients_are_the_same_padded_padding_free_and_packed(tiny_model_dir, attn):
    """The three batch layouts of the SFT recipe compute the same objective on the same examples."""
    from types import SimpleNamespace

    from alignforge.recipes.sft import CausalLMObjective, make_units

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    ex = examples([7, 11, 4, 9], model.config.vocab_size, seed=3)
    objective, results = CausalLMObjective(), []
    for packing, padding_free in [(False, False), (False, True), (True, True)]:
        cfg = SimpleNamespace(packing=packing, padding_free=padding_free, max_length=16)
        units, collate = make_units(ex, cfg, pad_id=0)
        batch = collate(units)
        model.zero_grad()
        loss, _ = objective(model, batch)
        loss.backward()
        grad = model.get_input_embeddings().weight.grad.clone()
        results.append((float(loss), objective.count(batch), grad))
        if padding_free:
            assert (
                batch["input_ids"].numel()
                == sum(len(e) for e in ex) + (batch["segment_ids"] < 0).sum()
            )  # rows of at most max_length, padding only at the end of a short row
            assert batch["input_ids"].shape[1] <= 32
    (l0, c0, g0), *rest = results
    for loss, count, grad in rest:
        assert count == c0 == sum(len(e) - 2 for e in ex)
        assert abs(loss - l0) < 1e-4 * abs(l0)
        torch.testing.assert_close(grad, g0, atol=1e-5, rtol=1e-4)
