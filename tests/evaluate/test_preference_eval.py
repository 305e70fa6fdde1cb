"""`alignforge eval --task preference`: accuracies, baselines and intervals computed by hand."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from alignforge.evaluate import preference as pref
from alignforge.evaluate.stats import bootstrap_by_group


def test_outcomes_length_baseline_and_length_split_by_hand():
    """Scores (c, r): (2, 1) right, (0, 1) wrong, (1, 1) a tie, worth 0.5, (3, 0) right.
    Lengths: the chosen answer is longer in pairs 0 and 1, equal in 2, shorter in 3, so 'prefer
    the longer answer' scores 1 + 1 + 0.5 + 0 = 2.5 of 4."""
    won = pref.outcomes([2, 0, 1, 3], [1, 1, 1, 0])
    assert won.tolist() == [1.0, 0.0, 0.5, 1.0]
    lengths = np.array([[5, 3], [7, 2], [4, 4], [1, 6]])
    by_length = pref.outcomes(lengths[:, 0], lengths[:, 1])
    assert by_length.tolist() == [1.0, 1.0, 0.5, 0.0] and by_length.mean() == 2.5 / 4
    assert pref.length_split(won, lengths) == {
        "when_chosen_longer": 0.5,  # pairs 0, 1
        "when_length_does_not_decide": 0.75,  # pairs 2 (tie, 0.5) and 3 (right)
        "when_chosen_shorter": 1.0,  # pair 3
        "length_balanced": 0.75,
    }
    # a rule that looks at length alone scores 1 and 0 on the two sides: 50% balanced
    assert pref.length_split(by_length, lengths)["length_balanced"] == 0.5


def test_by_prompt_interval_by_hand():
    """Prompt A has 3 right pairs, prompt B 1 wrong pair: accuracy 3/4. Resampling two prompts
    draws {A, A} (accuracy 6/6) with probability 1/4, {A, B} (3/4) 1/2, {B, B} (0/2) 1/4, so the
    95% interval is [0, 1]; resampling the four pairs alone is narrower. One prompt: width 0."""
    won, groups = np.array([1.0, 1.0, 1.0, 0.0]), ["A", "A", "A", "B"]
    est = bootstrap_by_group(won, groups, n_boot=4000, seed=0)
    assert (est.value, est.low, est.high) == (0.75, 0.0, 1.0)
    block = pref.accuracy_block(won, groups, n_boot=4000, alpha=0.05, seed=0)
    assert block["ci_pairs"][0] > 0.0 and block["ci_prompts"] == [0.0, 1.0]
    one = bootstrap_by_group(won, ["A"] * 4, n_boot=100)
    assert one.low == one.high == 0.75
    assert "zero width" in pref.size_warnings(4, 1)[1]


def test_a_model_as_good_as_the_length_rule_does_not_beat_it():
    """Same outcomes as 'prefer the longer answer': difference 0 with a zero-width interval.
    Same accuracy on other pairs: the difference's interval straddles 0. Neither beats it."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=(120, 2))
    by_length = pref.outcomes(lengths[:, 0], lengths[:, 1])
    groups = [i // 2 for i in range(120)]
    same = pref.system_report(by_length, lengths, groups, {"longer_answer": by_length}, n_boot=500)
    assert same["vs"]["longer_answer"] == {
        "difference": 0.0,
        "ci_prompts": [0.0, 0.0],
        "beats": False,
    }
    shuffled = rng.permutation(by_length)  # the same accuracy, right on other pairs
    other = pref.system_report(shuffled, lengths, groups, {"longer_answer": by_length}, n_boot=500)
    assert other["accuracy"] == same["accuracy"]
    lo, hi = other["vs"]["longer_answer"]["ci_prompts"]
    assert lo < 0 < hi and not other["vs"]["longer_answer"]["beats"]
    assert other["warnings"] == []  # 120 pairs, 60 prompts


def test_untrained_heads_spread_by_hand():
    """One feature, h_c - h_r = +1 on every pair: a head with w > 0 is always right, w < 0
    always wrong, so the heads' accuracies are 0 or 1, half of each."""
    features = np.zeros((10, 2, 1))
    features[:, 0, 0] = 1.0
    acc = pref.random_head_accuracies(features, n_heads=2000, seed=0)
    assert set(acc.tolist()) == {0.0, 1.0} and abs(acc.mean() - 0.5) < 0.05


def test_small_sets_warn_and_report_the_coin_range():
    """3 right pairs of 3: the bootstrap interval is [1, 1], yet a coin gets 3 of 3 one time in
    8; the report warns and does not call it better than a coin flip."""
    three = pref.system_report(np.ones(3), np.ones((3, 2)), [0, 1, 2], {}, n_boot=200)
    assert three["ci_pairs"] == [1.0, 1.0] and not three["vs"]["coin_flip"]["beats"]
    warn = pref.size_warnings(3, 3)
    assert len(warn) == 1 and warn[0].startswith(
        "only 3 pairs: a coin flip scores anywhere from 0%"
    )
    lo, hi = pref.coin_range(100)
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62


@pytest.fixture(scope="module")
def systems(tiny_model_dir, tmp_path_factory):
    """A reward model with an untrained head and a fresh (zero) LoRA adapter on the tiny model."""
    import torch

    from alignforge.models import load_model, load_tokenizer, wrap_lora
    from alignforge.models.heads import RewardModel, ScalarHead

    d = tmp_path_factory.mktemp("pref_systems")
    torch.manual_seed(0)
    lm = load_model(str(tiny_model_dir))
    RewardModel(lm, ScalarHead(lm.config.hidden_size), max_length=48).save(
        d / "rm", load_tokenizer(str(tiny_model_dir))
    )
    policy = wrap_lora(load_model(str(tiny_model_dir)), 4, 8, 0.0, "all")
    policy.save_pretrained(d / "dpo")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(d / "dpo")
    return d


def test_cli_scores_systems_beside_hand_computed_baselines(tiny_model_dir, systems, tmp_path):
    """Four pairs over three prompts; the chosen answer is longer in pairs 0, 1 and 3 (3 of 4),
    so 'prefer the longer answer' scores 75%. A fresh adapter's implicit reward is 0 for every
    answer: all ties, exactly 50%. The reward model's accuracy is its own scores' (checked
    against scoring each answer alone). Categories are reported apart."""
    from alignforge.cli import app
    from alignforge.models.heads import load_reward_model

    rows = [
        {"prompt": "q a", "chosen": "a b c d e", "rejected": "a", "category": "x"},
        {"prompt": "q a", "chosen": "b c d", "rejected": "c", "category": "x"},
        {"prompt": "q b", "chosen": "d", "rejected": "e f g h", "category": "y"},
        {"prompt": "q c", "chosen": "f g h i", "rejected": "g h", "category": "y"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    args = ["eval", "--task", "preference", "--data", str(data), "-o", str(out)]
    args += ["--model", str(tiny_model_dir), "--system", f"rm={systems / 'rm'}"]
    args += ["--system", f"dpo={systems / 'dpo'}", "--max-length", "48", "--n-boot", "200"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    base = r["baselines"]
    assert (r["n_pairs"], r["n_prompts"]) == (4, 3)
    assert base["longer_answer"]["accuracy"] == 0.75 and base["chosen_longer_share"] == 0.75
    assert base["coin_flip"]["accuracy"] == 0.5 and base["untrained_heads"]["n_heads"] == 1000
    dpo = r["systems"]["dpo"]
    assert dpo["scored_by"] == "implicit reward" and dpo["accuracy"] == 0.5
    assert dpo["vs"]["longer_answer"]["difference"] == pytest.approx(-0.25)
    assert set(dpo["by_category"]) == {"x", "y"} and dpo["by_category"]["x"]["n_pairs"] == 2
    rm = load_reward_model(systems / "rm")
    c = rm.score([x["prompt"] for x in rows], [x["chosen"] for x in rows])
    rj = rm.score([x["prompt"] for x in rows], [x["rejected"] for x in rows])
    assert r["systems"]["rm"]["accuracy"] == pref.outcomes(c, rj).mean()
    assert r["systems"]["rm"]["warnings"][0].startswith("only 4 pairs")
    md = (out / "results.md").read_text()
    assert "| *longer answer* | 4 | 75.0% |" in md and "**dpo** beats: coin flip no" in md
