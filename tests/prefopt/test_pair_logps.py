"""Per-sequence log-probs: packed, padding-free and shared-prompt batches equal separate passes."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignforge.data.preference import collate_pairs, prepare_pairs
from alignforge.recipes.dpo import pair_logps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    rows = json.load(open(os.path.join(ROOT, "examples/data/dpo_en_demo.json")))[:5]
    rows.append({"prompt": "Hi", "chosen": "Hello there, friend.", "rejected": "Go."})
    pairs, _ = prepare_pairs(rows, tok, max_length=80)  # variable lengths, some truncated
    return tok, model, pairs


def separate(model, prompt, response):
    """log p(response | prompt) from one unbatched, unmasked forward: sum over response tokens
    of log_softmax(logits[t]) at token t + 1 (the causal shift); prompt tokens are not scored."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1 :].sum()


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_every_layout_equals_separate_forward_passes(setup, layout):
    tok, model, pairs = setup
    batch = collate_pairs(pairs, tok.pad_token_id, layout=layout, pack_length=160)
    with torch.no_grad():
        logps, n_tok = pair_logps(model, batch)
    P = len(pairs)
    want = [separate(model, p.prompt_ids, p.chosen_ids) for p in pairs]
    want += [separate(model, p.prompt_ids, p.rejected_ids) for p in pairs]
    torch.testing.assert_close(logps, torch.stack(want), atol=2e-4, rtol=1e-5)
    assert n_tok.tolist() == [len(p.chosen_ids) for p in pairs] + [
        len(p.rejected_ids) for p in pairs
    ]
    # the prompt carries no loss: targets are exactly the response tokens
    assert len(batch["tgt_id"]) == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    if layout != "padded":  # no padding waste: fewer rows than sequences
        assert batch["input_ids"].shape[0] < 2 * P


def test_shared_prompt_encodes_the_prompt_once_and_hides_chosen_from_rejected(setup):
    tok, _, pairs = setup
    p = pairs[-1]
    batch = collate_pairs([p], tok.pad_token_id, layout="shared")
    n, c, r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
    assert batch["input_ids"].shape == (1, n + c + r)
    mask = batch["attention_mask"][0, 0]
    assert not mask[n + c :, n : n + c].any()  # rejected never sees chosen
    assert mask[n + c :, :n].all()  # ... but sees the whole prompt
    assert batch["position_ids"][0, n + c :].tolist() == list(range(n, n + r))
    # the first rejected token is predicted from the prompt's last position
    first_rejected = batch["tgt_seq"].tolist().index(1)
    assert batch["tgt_pred"][first_rejected] == n - 1


def test_an_unshifted_score_would_differ(setup):
    """Guards the shift test above: scoring token t with logits[t] gives another number."""
    _, model, pairs = setup
    p = pairs[-1]
    ids = torch.tensor([p.prompt_ids + p.chosen_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    unshifted = (
        torch.log_softmax(logits, -1).gather(-1, ids[0, :, None])[len(p.prompt_ids) :, 0].sum()
    )
    assert abs(float(unshifted - separate(model, p.prompt_ids, p.chosen_ids))) > 1e-2


def test_packed_gradients_equal_padded_gradients(setup, tiny_model_dir):
    tok, _, pairs = setup
    grads = {}
    for layout in ("padded", "shared"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
        batch = collate_pairs(pairs, tok.pad_token_id, layout=layout)
        pair_logps(model, batch)[0].sum().backward()
        grads[layout] = torch.cat([q.grad.flatten() for q in model.parameters()])
    torch.testing.assert_close(grads["shared"], grads["padded"], atol=1e-4, rtol=1e-3)


def test_wrapped_models_take_the_logits_path_with_the_same_result(setup):
    """A DDP-style wrapper (``.module``) goes through the model's own forward with logits at the
    kept positions; the chunked LM-head path must agree with it."""
    tok, model, pairs = setup

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, **kw):
            return self.module(**kw)

    batch = collate_pairs(pairs, tok.pad_token_id, layout="packed")
    with torch.no_grad():
        direct = pair_logps(model, batch)[0]
        wrapped = pair_logps(Wrapper(model), batch)[0]
    torch.testing.assert_close(direct, wrapped, atol=2e-4, rtol=1e-5)
