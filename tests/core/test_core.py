"""The training core: placement in one place, an optimizer step, rank hygiene on 2 processes."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from multiproc import free_port
from torch import nn

from alignforge.config import ConfigError
from alignforge.training import NonFiniteLossError, make_accelerator, place_frozen, to_device
from alignforge.training.loop import TrainCore, assert_on_device

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def args(tmp_path, **kw):
    base = dict(
        seed=0, learning_rate=0.1, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, lr_scheduler_type="constant", warmup_steps=0, warmup_ratio=0.0,
        max_grad_norm=1.0, output_dir=str(tmp_path), save_total_limit=2, report_to="jsonl",
        progress=False,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_placement_is_checked_where_it_happens(tmp_path):
    """A trained or frozen module off the run's device fails at once, naming the tensor."""
    acc = make_accelerator(0)
    frozen = nn.Linear(2, 2, device="meta")
    with pytest.raises(RuntimeError, match=r"frozen model \(use place_frozen\): weight is on meta"):
        TrainCore(nn.Linear(2, 2), args(tmp_path), 1, acc, frozen=[frozen])
    placed = place_frozen(acc, nn.Linear(2, 2))
    assert not placed.training and not any(p.requires_grad for p in placed.parameters())
    assert_on_device(placed, acc.device, "x")
    core = TrainCore(nn.Linear(2, 2), args(tmp_path), 1, acc, frozen=[placed])
    batch = core.to_device({"x": torch.ones(2), "n": 3})
    assert batch["x"].device.type == acc.device.type and batch["n"] == 3
    with pytest.raises(RuntimeError, match="trained model: weight is on meta"):
        assert_on_device(nn.Linear(2, 2, device="meta"), acc.device, "trained model")
    assert to_device({"a": torch.zeros(1)}, "cpu")["a"].device.type == "cpu"


def test_one_step_is_the_mean_gradient_clipped_on_the_full_norm(tmp_path):
    """w = 0, loss_i = -(w . x_i): the step's gradient is -mean(x) and SGD-like Adam moves
    every coordinate by lr on step 1 (Adam's first step is lr * sign(g))."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(model.weight)
    core = TrainCore(model, args(tmp_path, max_grad_norm=0.5), 1, make_accelerator(0))
    xs = [torch.tensor([1.0, 2.0, -2.0]), torch.tensor([3.0, 0.0, 2.0])]
    sums = core.accumulate(xs, lambda m, x: (-(m(x[None]).sum()), {"n": 1.0}), 0.5)
    assert sums["n"] == 2.0
    grad = model.weight.grad.clone()
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -1.0, 0.0]]))
    norm = core.optimizer_step()
    assert norm == pytest.approx(5**0.5)  # the norm before clipping
    torch.testing.assert_close(model.weight.data, torch.tensor([[0.1, 0.1, 0.0]]))


def test_nan_loss_stops_with_the_step_and_micro_batch(tmp_path):
    core = TrainCore(nn.Linear(2, 1), args(tmp_path), 1, make_accelerator(0))
    bad = [torch.ones(2), torch.full((2,), float("nan"))]
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1 \(micro-batch 1\)"):
        core.accumulate(bad, lambda m, x: (m(x).sum(), {}), 1.0)


def test_checkpoint_keeps_extra_and_per_rank_state(tmp_path):
    core = TrainCore(nn.Linear(2, 1), args(tmp_path), 4, make_accelerator(0))
    core.step = 3
    core.set_lr_scale(0.5)
    core.save(extra={"kl": 0.2}, rank_extra={"queue": [1, 2]})
    other = TrainCore(nn.Linear(2, 1), args(tmp_path), 4, make_accelerator(0))
    _, extra, mine = other.load(core.ckpt.latest())
    assert other.step == 3 and extra == {"kl": 0.2} and mine == {"queue": [1, 2]}
    assert other.lr_scale == 0.5 and other.lr() == pytest.approx(0.05)
    for a, b in zip(core.model.parameters(), other.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_decays_and_resumes_at_the_same_rate(tmp_path, kind):
    """transformers' schedules: lr 0.1 * s / 2 while s < 2 warmup steps, then, with
    p = (s - 2) / 8 of 10 steps, 0.1 * (1 + cos(pi p)) / 2 (cosine), 0.1 * (1 - p) (linear) or
    0.1 (constant). A checkpoint at step 4 resumes at step 4's rate."""
    import math

    decay = {
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
        "linear": lambda p: 1 - p,
        "constant": lambda p: 1.0,
    }[kind]
    want = [0.1 * (s / 2 if s < 2 else decay((s - 2) / 8)) for s in range(11)]
    core = TrainCore(
        nn.Linear(2, 1), args(tmp_path, lr_scheduler_type=kind, warmup_steps=2), 10,
        make_accelerator(0),
    )  # fmt: skip
    got = [core.lr()]
    for s in range(1, 11):
        core.optimizer.step()
        core.scheduler.step()
        core.step = s
        got.append(core.lr())
        if s == 4:
            core.save()
    assert got == pytest.approx(want, abs=1e-12)
    other = TrainCore(
        nn.Linear(2, 1), args(tmp_path, lr_scheduler_type=kind, warmup_steps=2), 10,
        make_accelerator(0),
    )  # fmt: skip
    other.load(tmp_path / "checkpoint-4")
    assert other.lr() == pytest.approx(want[4], abs=1e-12)
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(want[4], abs=1e-12)


def test_sharded_backends_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP is not supported.*torchrun"):
        make_accelerator(0)


def test_eval_with_fewer_units_than_processes_finishes(tiny_model_dir, tmp_path):
    """One eval row on two processes: rank 1 has nothing to evaluate and must not hang."""
    rows = json.load(open(os.path.join(ROOT, "examples/data/alpaca_en_demo.json")))[:9]
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    held.write_text(json.dumps(rows[8]) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "alignforge.cli", "train", "/dev/null",
           "stage=sft", f"model_name_or_path={tiny_model_dir}", f"dataset={train}",
           f"eval_dataset={held}", "max_length=64", "max_steps=2", "eval_steps=1",
           "per_device_train_batch_size=2", "progress=false", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    evals = [json.loads(x) for x in open(tmp_path / "run/metrics.jsonl")]
    evals = [r for r in evals if r["split"] == "eval"]
    assert len(evals) >= 2 and all(r["loss"] > 0 for r in evals)


def test_mixed_precision_reaches_every_loss(tmp_path):
    """bf16 on one process: the loss runs under autocast, whatever path the recipe takes."""
    core = TrainCore(nn.Linear(4, 1), args(tmp_path), 1, make_accelerator(0, "bf16"))
    seen = []

    def loss_fn(model, x):
        seen.append((x @ x.T).dtype)  # any op of the recipe's, not only the model's forward
        return model(x).float().sum(), {}

    core.accumulate([torch.ones(2, 4)], loss_fn, 1.0)
    assert seen == [torch.bfloat16]


def test_bf16_switch_changes_the_fast_sft_path(tiny_model_dir, tmp_path):
    """SFT's padding-free fast path calls the decoder directly: with ``bf16: true`` it too runs
    in bfloat16, so the first loss moves a little from the float32 one."""
    from alignforge.config import build_config
    from alignforge.config.stages import SFTConfig
    from alignforge.recipes import sft

    rows = json.load(open(os.path.join(ROOT, "examples/data/alpaca_en_demo.json")))[:8]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for bf16 in (False, True):
        out = tmp_path / f"bf16-{bf16}"
        c = dict(model_name_or_path=tiny_model_dir, dataset=str(data), output_dir=str(out),
                 max_length=64, max_steps=1, per_device_train_batch_size=4, progress=False,
                 bf16=bf16)  # fmt: skip
        sft.run(build_config(SFTConfig, c))
        rows_ = [json.loads(x) for x in open(out / "metrics.jsonl")]
        losses[bf16] = [r["loss"] for r in rows_ if r["split"] == "train"][0]
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
