"""ROUGE-L and token F1 by hand; the registry; a user task in a few lines."""

import pytest

from alignforge.evaluate.tasks import Task, get_task, list_tasks, register_task
from alignforge.evaluate.tasks.instruction import lcs_length, rouge_l, token_f1


def test_rouge_l_hand_computed():
    # pred: the cat sat on the mat (6), ref: the cat is on the mat (6); LCS = the cat on the mat
    # = 5 -> P = R = 5/6 -> F = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


def test_token_f1_hand_computed():
    # pred tokens a a b (3), ref a b c d (4): overlap min counts a:1 b:1 = 2
    # P = 2/3, R = 2/4 -> F = 2PR/(P+R) = 4/7
    assert token_f1("a a b", "A, b c d") == pytest.approx(4 / 7)


def test_instruction_task_alpaca_rows_and_reward():
    task = get_task("instruction")
    ex = task.example({"instruction": "Translate", "input": "bonjour", "output": "hello"}, 0)
    assert ex.messages == [{"role": "user", "content": "Translate\n\nbonjour"}]
    assert ex.reference == "hello"
    res = task.evaluate(["hello", "good bye"], ["hello", "hello there"], n_boot=200)
    assert res.metrics["rouge_l"].value == pytest.approx((1.0 + 0.0) / 2)
    # "hello" vs "hello there": LCS 1, P = 1, R = 1/2 -> F = 2/3
    assert task.reward("hello", "hello there") == pytest.approx(2 / 3)
    assert task.reward("good bye", "hello there") == res.items[1].values["rouge_l"] == 0.0
    assert get_task("instruction", reward_metric="token_f1").reward("a a b", "a b c d") == (
        pytest.approx(4 / 7)
    )


def test_user_task_in_ten_lines():
    @register_task("yes_no_test")
    class YesNo(Task):
        system_prompt = "Answer with yes or no only."

        def score(self, prediction: str, reference: str) -> float:
            return float(prediction.strip().lower().startswith(reference.strip().lower()))

    task = get_task("yes_no_test")
    assert "yes_no_test" in list_tasks()
    assert task.reward("Yes, it is.", "yes") == 1.0
    res = task.evaluate(["yes", "no", "yes", "yes"], ["yes", "yes", "yes", "no"], n_boot=200)
    assert res.metrics["score"].value == 0.5
    ex = task.example({"prompt": "Is water wet?", "answer": "yes"}, 0)
    assert ex.messages[0] == {"role": "system", "content": "Answer with yes or no only."}


def test_unknown_task_lists_registered():
    with pytest.raises(KeyError, match="registered: .*extraction"):
        get_task("nope")


def test_marginal_reward_of_a_mean_metric_is_the_item_reward():
    """iterate's default reward changes nothing for tasks whose metric is a mean of item scores."""
    item, marginal = get_task("instruction"), get_task("instruction", marginal_reward=True)
    preds, refs = (
        ["the cat sat", "a dog", "hello world there"],
        ["the cat sat on the mat", "the dog", "hello world"],
    )
    for _ in range(2):  # the second batch is pooled with the first
        assert marginal.rewards(preds, refs) == pytest.approx(item.rewards(preds, refs))
