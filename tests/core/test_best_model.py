"""Early stopping and load_best_model_at_end on a metric the stage reports, not only eval loss."""

import json

import pytest
import torch
from test_core import args as core_args
from torch import nn

from alignforge.training import TrainLoop, make_accelerator


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))


class Objective:
    """Training pulls ``w`` from 0 towards 1 (loss ``(w - 1)^2`` per unit); the eval "accuracy"
    ``1 - (w - 0.3)^2`` peaks at ``w = 0.3``, which Adam's steps of about ``lr = 0.1`` reach at
    step 3. The eval loss keeps falling, so only the accuracy says step 3 was best."""

    def count(self, batch):
        return float(len(batch["x"]))

    def tokens(self, batch):
        return len(batch["x"])

    def __call__(self, model, batch):
        n = len(batch["x"])
        loss = n * (model.w - 1) ** 2
        return loss, {"accuracy": n * (1 - (model.w.detach() - 0.3) ** 2)}


def args(tmp_path, **kw):
    base = dict(
        per_device_train_batch_size=2, per_device_eval_batch_size=2, gradient_accumulation_steps=1,
        max_steps=8, num_train_epochs=1, logging_steps=1, eval_steps=1, save_steps=None,
        early_stopping_patience=2, early_stopping_threshold=0.0, best_metric=("accuracy", True),
        load_best_model_at_end=True, resume_from_checkpoint=False,
    )  # fmt: skip
    return core_args(tmp_path, **{**base, **kw})


class Interrupted(Exception):
    pass


def fit(tmp_path, stop_at=None, **kw):
    ws = {}

    def record(lp, row):
        ws[lp.step] = float(lp.unwrapped.w.detach())
        if lp.step == stop_at:  # after the step's evaluation and checkpoint
            raise Interrupted

    loop = TrainLoop(
        Scalar(), Objective(), [0.0] * 4, lambda u: {"x": torch.tensor(u)}, args(tmp_path, **kw),
        eval_units=[0.0] * 2, accelerator=make_accelerator(0), callbacks=[record],
    )  # fmt: skip
    try:
        return loop, loop.fit(), ws
    except Interrupted:
        return loop, None, ws


def test_stops_on_accuracy_and_restores_the_best_step(tmp_path):
    loop, result, ws = fit(tmp_path)
    assert ws[3] == pytest.approx(0.3, abs=0.02)
    assert result["stopped_early"] and result["steps"] == 5  # steps 4 and 5 were worse
    best = result["best_metric"]
    assert best["name"] == "accuracy" and best["step"] == 3 and best["restored"]
    assert float(loop.unwrapped.w) == ws[3]  # the weights saved after this are step 3's
    assert result["final_eval"]["accuracy"] == pytest.approx(best["value"])
    assert result["best_eval_loss"] is None  # the loss was not the metric
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    evals = [r["step"] for r in rows if r["split"] == "eval"]
    assert evals == [1, 2, 3, 4, 5]  # the stopping step's evaluation is the final one: once


def test_without_load_best_the_last_weights_stay(tmp_path):
    loop, result, ws = fit(tmp_path, load_best_model_at_end=False)
    assert result["best_metric"]["step"] == 3 and not result["best_metric"]["restored"]
    assert float(loop.unwrapped.w) == ws[5]


def test_the_best_weights_survive_an_interruption(tmp_path):
    """Interrupted at step 4 (a checkpoint there, the best at step 3), resumed: the run still
    stops at step 5 and restores step 3's weights, read back from the run folder."""
    _, _, first = fit(tmp_path, stop_at=4, save_steps=4)
    loop, result, ws = fit(tmp_path, resume_from_checkpoint="auto")
    assert result["resumed_from"].endswith("checkpoint-4") and result["steps"] == 5
    assert float(loop.unwrapped.w) == first[3] and result["best_metric"]["step"] == 3


def test_an_unknown_metric_is_named():
    loop = TrainLoop.__new__(TrainLoop)
    loop.args = type("A", (), {"best_metric": ("f1", True)})()
    loop.logger = type("L", (), {"log": lambda self, row: None})()
    loop.step = 1
    with pytest.raises(ValueError, match=r"reports \['accuracy', 'loss'\], not 'f1'"):
        loop._after_eval({"loss": 1.0, "accuracy": 0.5})
