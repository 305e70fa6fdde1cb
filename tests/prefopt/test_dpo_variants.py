"""SimPO, ORPO and KTO in the DPO recipe: no reference for SimPO/ORPO, KTO's data and KL point."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignforge.config import ConfigError, build_config
from alignforge.config.preference import DPOConfig
from alignforge.data import DataError
from alignforge.data.kto import prepare_kto
from alignforge.losses.kto import kto_kl, kto_loss
from alignforge.recipes import dpo

WORDS = "river stone cloud apple tiger lamp garden piano rocket forest candle mirror".split()
LAYOUT = dict(share_prompt=False, padding_free=True, pack_length=128, max_length=64)


def pairs(words=WORDS):
    return [
        {
            "prompt": f"Tell me about the {w}.",
            "chosen": f"Yes, gladly: the {w} is here.",
            "rejected": f"No way: the {w}.",
        }
        for w in words
    ]


def unpaired(words=WORDS):
    """Each prompt answered once: alternately a desirable and an undesirable answer."""
    return [
        {"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"],
         "label": bool(i % 2)}
        for i, r in enumerate(pairs(words))
    ]  # fmt: skip


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(model, data, out, **kw):
    base = dict(
        stage="dpo", model_name_or_path=model, dataset=data, val_size=0.25, output_dir=str(out),
        max_length=64, per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2,
        lora_dropout=0.0, progress=False, report_to="none",
    )  # fmt: skip
    return build_config(DPOConfig, {**base, **kw})


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_train_without_a_reference(
    tiny_model_dir, tmp_path, monkeypatch, loss_type
):
    """Full fine-tuning makes no frozen copy and no step runs a reference pass."""
    built = []
    real_build = dpo.build_policy

    def build(*a, **k):
        built.append(real_build(*a, **k))
        return built[-1]

    def no_reference(*a, **k):
        raise AssertionError("a reference pass ran")

    monkeypatch.setattr(dpo, "build_policy", build)
    monkeypatch.setattr(dpo, "reference_logps", no_reference)
    data = write(tmp_path / "pairs.jsonl", pairs())
    s = dpo.run(cfg(tiny_model_dir, data, tmp_path / "run", loss_type=loss_type,
                    finetuning_type="full", beta=2.0 if loss_type == "simpo" else 0.1))  # fmt: skip
    assert built[0][1] is None
    last = s["last_train"]
    assert math.isfinite(last["loss"]) and last["nll_loss"] > 0
    if loss_type == "orpo":  # NLL + beta * (-log sigmoid(log odds)) > NLL
        assert last["loss"] > last["nll_loss"]
    # the held-out report scores by mean log-prob per token, with no base-model baseline
    assert s["eval"]["n_pairs"] == 3 and "base_logp" not in s["baselines"]


def test_kto_reads_unpaired_and_paired_rows_with_mismatched_answers(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex, stats = prepare_kto(unpaired(), tok, 64)
    assert len(ex) == len(WORDS) and (stats.desirable, stats.undesirable) == (6, 6)
    assert [e.label for e in ex] == [bool(i % 2) for i in range(len(WORDS))]
    # each example's second sequence is the next example's answer: another prompt's
    for a, b in zip(ex, ex[1:] + ex[:1], strict=True):
        assert a.rejected_ids == b.chosen_ids and a.prompt_key != b.prompt_key
    ex2, stats2 = prepare_kto(pairs(), tok, 64)
    assert len(ex2) == 2 * len(WORDS) and (stats2.desirable, stats2.undesirable) == (12, 12)
    assert [e.label for e in ex2[:4]] == [True, False, True, False]
    assert ex2[0].prompt_ids == ex2[1].prompt_ids and ex2[0].chosen_ids != ex2[1].chosen_ids
    # chosen of pair 0 is mismatched with pair 1's chosen, not with its own rejected answer
    assert ex2[0].rejected_ids == ex2[2].chosen_ids and ex2[1].rejected_ids == ex2[2].chosen_ids


def test_kto_data_errors_name_the_row_or_the_reason(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    one_prompt = [{"prompt": "Hi.", "completion": c, "label": c == "Hello."}
                  for c in ("Hello.", "Go away.")]  # fmt: skip
    with pytest.raises(DataError, match="every usable answer is to one prompt"):
        prepare_kto(one_prompt, tok, 64)
    bad = unpaired()
    bad[3]["completion"] = ""
    with pytest.raises(DataError, match="dataset row 3: completion is empty"):
        prepare_kto(bad, tok, 64)
    kept, stats = prepare_kto(bad, tok, 64, skip_bad_rows=True)
    assert stats.bad_rows == 1 and len(kept) == len(WORDS) - 1


def test_kto_objective_equals_the_loss_on_separately_scored_sequences(tiny_model_dir):
    """The objective's loss equals kto_loss on log-probs from plain forwards of
    prompt + answer (policy and reference), with z0 from prompt + the mismatched answer."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex, _ = prepare_kto(unpaired()[:6], tok, 64)
    torch.manual_seed(4)  # a drift whose z0 is > 0 (z0 is clamped at 0)
    policy, ref = dpo.build_policy(tiny_model_dir, "full")
    with torch.no_grad():
        for p in policy.parameters():  # the policy drifts from the reference
            p.add_(0.02 * torch.randn_like(p))
    batch = dpo.make_collate(tok.pad_token_id, type("C", (), LAYOUT))(ex)
    objective = dpo.KTOObjective(beta=0.3, desirable_weight=1.5, ref_model=ref)
    policy.eval()
    with torch.no_grad():
        loss_sum, stats = objective(policy, batch)

    def seq_logp(model, prompt, answer):
        ids = torch.tensor([prompt + answer])
        logp = model(ids).logits[0, :-1].log_softmax(-1)
        tgt = ids[0, 1:]
        return logp.gather(-1, tgt[:, None])[len(prompt) - 1 :].sum()

    with torch.no_grad():
        lp = torch.stack([seq_logp(policy, e.prompt_ids, e.chosen_ids) for e in ex])
        rp = torch.stack([seq_logp(ref, e.prompt_ids, e.chosen_ids) for e in ex])
        kl_p = torch.stack([seq_logp(policy, e.prompt_ids, e.rejected_ids) for e in ex])
        kl_r = torch.stack([seq_logp(ref, e.prompt_ids, e.rejected_ids) for e in ex])
    z0 = kto_kl(kl_p, kl_r)
    want = kto_loss(lp, rp, torch.tensor([e.label for e in ex]), z0, 0.3, 1.5)
    assert z0 > 0
    torch.testing.assert_close(loss_sum, want.losses.sum(), atol=1e-5, rtol=1e-5)
    assert stats["kl"].item() == pytest.approx(z0.item() * len(ex), rel=1e-4)


def test_kto_trains_on_unpaired_rows_with_cached_reference_logps(tiny_model_dir, tmp_path):
    data = write(tmp_path / "kto.jsonl", unpaired())
    c = cfg(tiny_model_dir, data, tmp_path / "run", loss_type="kto", precompute_ref_logps=True,
            cache_dir=str(tmp_path / "cache"), share_prompt=True)  # fmt: skip
    s = dpo.run(c)
    assert s["ref_logps"] == {"train": "computed", "eval": "computed"}
    assert math.isfinite(s["last_train"]["loss"]) and s["last_train"]["kl"] >= 0
    assert s["data"]["desirable"] + s["data"]["undesirable"] == s["data"]["used"] == 9
    assert s["eval"] is None and "rewards/accuracies" in s["final_eval"]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (
            dict(loss_type="simpo", precompute_ref_logps=True),
            "precompute_ref_logps: loss_type simpo",
        ),
        (dict(loss_type="sigmoid", cpo_alpha=0.5), "cpo_alpha: only loss_type simpo"),
        (dict(loss_type="orpo", undesirable_weight=2.0), "undesirable_weight: only loss_type kto"),
    ],
)
def test_options_of_one_loss_are_refused_for_another(kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg("default", "x.jsonl", "out", **kw)


def test_a_margin_column_is_refused_without_a_margin_loss(tiny_model_dir, tmp_path):
    rows = [{**r, "margin": 0.5} for r in pairs()]
    data = write(tmp_path / "m.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for loss_type in ("simpo", "kto"):
        c = cfg(tiny_model_dir, data, tmp_path / loss_type, loss_type=loss_type)
        with pytest.raises(ValueError, match=f"use_margin: loss_type={loss_type} has no margin"):
            dpo.load_pairs(c, tok)


def test_build_policy_makes_no_reference_copy_when_asked(tiny_model_dir):
    policy, ref = dpo.build_policy(tiny_model_dir, "full", reference=False)
    assert ref is None and isinstance(
        policy, type(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    )
