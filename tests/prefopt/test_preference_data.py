"""Preference rows: formats, column mapping, margins, bad rows, over-long pairs."""

import json
import os

import pytest
from transformers import AutoTokenizer

from alignforge.data import DataError, read_rows
from alignforge.data.preference import (
    PreferencePair,
    cut,
    fit_pair,
    prepare_pairs,
    render_prompt,
    split_pair,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
Q = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_explicit_implicit_and_sharegpt_rows_give_the_same_pair():
    explicit = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    implicit = {
        "chosen": Q + [{"role": "assistant", "content": "Blue."}],
        "rejected": Q + [{"role": "assistant", "content": "Seven."}],
    }
    sharegpt = {
        "conversations": [{"from": "human", "value": "Name a colour."}],
        "chosen": {"from": "gpt", "value": "Blue."},
        "rejected": {"from": "gpt", "value": "Seven."},
    }
    want = (
        Q,
        [{"role": "assistant", "content": "Blue."}],
        [{"role": "assistant", "content": "Seven."}],
        None,
    )
    for row in (explicit, implicit, sharegpt):
        assert split_pair(row) == want


def test_column_mapping_and_margin(tok):
    rows = [{"q": "Name a colour.", "good": "Blue.", "bad": "Seven.", "gap": "0.5"}]
    cols = {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "gap"}
    pairs, stats = prepare_pairs(rows, tok, max_length=128, columns=cols)
    assert pairs[0].margin == 0.5 and stats.with_margin == 1
    with pytest.raises(DataError, match="column 'good' .*missing"):
        prepare_pairs([{"q": "x"}], tok, max_length=128, columns=cols)


def test_shipped_sharegpt_demo_file_is_read_through_detection(tok):
    rows = read_rows(os.path.join(ROOT, "examples/data/dpo_en_demo.json"))[:20]
    pairs, stats = prepare_pairs(rows, tok, max_length=4096)
    assert stats.used == 20 and stats.bad_rows == 0
    p = pairs[0]
    prompt = [{"role": "user", "content": rows[0]["conversations"][0]["value"]}]
    # the prompt is exactly what generation would see (add_generation_prompt=True)
    assert tok.decode(p.prompt_ids) == render_prompt(tok, prompt)
    assert tok.decode(p.chosen_ids).startswith(rows[0]["chosen"]["value"][:40])
    assert tok.decode(p.rejected_ids).startswith(rows[0]["rejected"]["value"][:40])


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen equals rejected"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": "   "}, "rejected is empty"),
        ({"prompt": "q", "chosen": "a"}, "cannot tell the preference format"),
    ],
)
def test_bad_row_fails_with_its_index_or_is_counted(tok, bad, msg):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad]
    with pytest.raises(DataError, match=f"data.jsonl row 1: .*{msg}"):
        prepare_pairs(rows, tok, max_length=64, source="data.jsonl")
    pairs, stats = prepare_pairs(rows, tok, max_length=64, skip_bad_rows=True)
    assert len(pairs) == 1 and stats.bad_rows == 1 and "row 1" in stats.bad_examples[0]


def test_the_length_rule_keeps_the_prompts_end_and_the_answers_start():
    """max_length 16, max_prompt_length 6: the prompt 1..10 keeps its last 6 tokens (5..10);
    each answer keeps its first 16 - 6 = 10 (chosen 11..20; rejected, 5 tokens, whole). The
    default budget is max_length // 2 = 8: prompt 3..10, answers' first 8 tokens. A prompt
    longer than the budget is cut even when the pair would fit, so what a sequence keeps
    depends on its prompt and its own answer only."""
    pair = PreferencePair(list(range(1, 11)), list(range(11, 31)), list(range(31, 36)))
    fit = fit_pair(pair, 16, "truncate", max_prompt_length=6)
    assert fit.prompt_ids == list(range(5, 11)) and fit.truncated
    assert fit.chosen_ids == list(range(11, 21)) and fit.rejected_ids == list(range(31, 36))
    fit = fit_pair(pair, 16, "truncate")
    assert (fit.prompt_ids, fit.chosen_ids) == (list(range(3, 11)), list(range(11, 19)))
    short = PreferencePair([1, 2, 3, 4], [5, 6], [7, 8])
    assert fit_pair(short, 16, "truncate") is short and fit_pair(short, 16, "drop") is short
    assert fit_pair(PreferencePair(list(range(10)), [5], [6]), 16, "truncate").prompt_ids == list(
        range(2, 10)
    )
    assert fit_pair(pair, 16, "drop") == "too_long"
    assert cut(list(range(10)), [7, 8, 9], 16, 6) == (list(range(4, 10)), [7, 8, 9])
    with pytest.raises(ValueError, match="max_prompt_length"):
        fit_pair(pair, 16, "truncate", max_prompt_length=16)


def test_over_long_pairs_are_truncated_or_dropped_and_counted(tok):
    long = " ".join(["word"] * 200)
    rows = [
        {"prompt": "short", "chosen": "yes " + long, "rejected": "no " + long},
        {"prompt": long, "chosen": "a", "rejected": "b"},  # the prompt is cut, nothing dropped
        {"prompt": "short", "chosen": long + " yes", "rejected": long + " no"},  # same once cut
        {"prompt": "short", "chosen": "a", "rejected": "b"},
    ]
    pairs, stats = prepare_pairs(rows, tok, max_length=48, truncation="truncate")
    counts = (stats.used, stats.truncated, stats.prompt_truncated, stats.answer_truncated)
    assert counts == (3, 2, 1, 1)
    assert (stats.dropped_too_long, stats.dropped_identical) == (0, 1)
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 48 for p in pairs)
    assert all(len(p.prompt_ids) <= 24 for p in pairs)
    assert pairs[0].lengths[0] > 200 > 48 > len(pairs[0].chosen_ids)  # lengths before the cut
    pairs, stats = prepare_pairs(rows, tok, max_length=48, truncation="drop")
    assert (stats.used, stats.dropped_too_long) == (1, 3)


def test_ipo_with_margin_and_unknown_keys_are_config_errors():
    from alignforge.config import ConfigError, build_config
    from alignforge.config.preference import DPOConfig

    base = {"dataset": "x.jsonl", "output_dir": "o"}
    with pytest.raises(ConfigError, match="share_prompt"):
        build_config(DPOConfig, {**base, "share_prompt": True, "padding_free": False})
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_config(DPOConfig, {**base, "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="loss_type"):
        build_config(DPOConfig, {**base, "loss_type": "bco"})
    assert json.loads(build_config(DPOConfig, base).model_dump_json())["stage"] == "dpo"
