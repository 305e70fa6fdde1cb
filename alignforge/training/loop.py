"""The one training core, on ``accelerate`` (``torchrun`` / ``accelerate launch`` run it with DDP).

    loop = TrainLoop(model, objective, train_units, collate, args, eval_units=eval_units)
    summary = loop.fit()

:class:`TrainCore` is the optimizer step every recipe shares (PPO builds its outer loop on it);
:class:`TrainLoop` is the supervised loop over units on top of it.

``objective(model, batch)`` returns the *summed* loss of a micro-batch and summed statistics;
``objective.count(batch)`` returns how many units (label tokens, pairs) the loss averages over.
Each optimizer step first counts the units of all its micro-batches on all processes, then
divides every micro-batch's summed loss by that global count. The result is the exact mean
over the global batch, whatever the split into micro-batches or processes (DDP averages
gradients over processes, so the loss is multiplied by the world size to undo that).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from alignforge.errors import UserError
from alignforge.training.checkpoint import (
    CheckpointManager,
    load_trainable_state,
    trainable_state,
)
from alignforge.training.interrupt import (
    TrainingInterrupted,
    signal_received,
    stoppable,
)
from alignforge.training.optim import build_optimizer, build_scheduler, warmup_steps
from alignforge.training.tracking import MetricsLogger


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left untouched."""

    exit_code = 1


class Objective(Protocol):
    def count(self, batch: dict) -> float: ...
    def tokens(self, batch: dict) -> int: ...
    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def make_accelerator(seed: int, mixed_precision: str | None = None):
    """The run's ``Accelerator``: CUDA when there is one, ``mixed_precision`` honoured everywhere.

    ``mixed_precision`` None takes ``accelerate launch --mixed_precision`` (its environment
    variable) or none; "bf16"/"fp16" come from the configs' ``bf16: true`` / ``fp16: true``.

    Sharded back-ends (FSDP, DeepSpeed) are refused: their sharded state is not yet gathered for
    saving, so a run would train and then fail or save a shard. DDP (``torchrun`` or
    ``accelerate launch`` with the multi-GPU config) is supported.
    """
    import os

    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from alignforge.config import ConfigError

    sharded = [
        n
        for n in ("FSDP", "DEEPSPEED")
        if os.environ.get(f"ACCELERATE_USE_{n}", "").lower() in ("1", "true")
    ]
    acc = None
    if not sharded:
        from accelerate.state import AcceleratorState

        # A run in the same process as an earlier one (iterate, demo, tests) must not inherit its
        # precision: accelerate keeps the first Accelerator's state. The process group is kept.
        AcceleratorState._reset_state()
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            sharded = [acc.distributed_type.value]
    if sharded:
        raise ConfigError(
            f"accelerate config: {sharded[0]} is not supported; alignforge trains data-parallel "
            "(DDP). Launch with `torchrun --nproc_per_node N -m alignforge.cli train ...` or an "
            "accelerate config with distributed_type: MULTI_GPU (examples/accelerate/ddp.yaml)."
        )
    set_seed(seed)
    return acc


def to_device(batch: dict, device) -> dict:
    """The one place a batch moves to the training device: every tensor in ``batch``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def place_frozen(acc, module):
    """A module that is used but not trained (a reference model, a reward model): on
    ``acc.device``, in eval mode, without gradients. Returns it (``None`` passes)."""
    if module is None:
        return None
    module.requires_grad_(False)
    return module.to(acc.device).eval()


def assert_on_device(module, device, what: str) -> None:
    """Every parameter and buffer of ``module`` is on ``device``, or a one-line error says which is not."""
    want = torch.device(device)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        index_differs = (
            want.type != "cpu" and want.index is not None and t.device.index != want.index
        )
        if t.device.type != want.type or index_differs:
            raise RuntimeError(f"{what}: {name} is on {t.device}, the run trains on {want}")


class TrainCore:
    """The one optimizer-step core every recipe trains with, PPO included.

    It owns what is the same for every method: ``accelerate`` preparation and device placement of
    the trained module (frozen ones go through :func:`place_frozen`), mixed precision (the loss
    runs under ``acc.autocast()`` on every path), optimizer and schedule, accumulation with
    ``no_sync``, clipping of the full gradient norm, the NaN guard, rank-0 checkpoints and metrics,
    exact resume with a recipe's extra state (global and per rank) and RNG, and the progress bar.
    A recipe says what a micro-batch's loss is; the core says how to train on it.

    ``args`` provides: seed, learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon,
    lr_scheduler_type, warmup_steps, warmup_ratio, max_grad_norm, output_dir, save_total_limit,
    report_to, progress; optionally run_name (the trackers' run name, default the output folder's).
    """

    def __init__(self, trained, args, total_steps: int, accelerator=None, frozen=()):
        self.args = args
        self.acc = accelerator or make_accelerator(args.seed)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.total_steps = total_steps
        self.out = Path(args.output_dir)
        self.ckpt = CheckpointManager(self.out, keep=args.save_total_limit)
        self.logger = MetricsLogger(
            self.out,
            args.report_to,
            enabled=self.acc.is_main_process,
            run_name=getattr(args, "run_name", None),
            # what the trackers record as the run's config: the resolved stage config
            config=args.model_dump(mode="json") if hasattr(args, "model_dump") else None,
        )
        self.step, self.lr_scale = 0, 1.0
        optimizer = build_optimizer(
            trained,
            args.learning_rate,
            args.weight_decay,
            (args.adam_beta1, args.adam_beta2),
            args.adam_epsilon,
        )
        warm = warmup_steps(total_steps, args.warmup_steps, args.warmup_ratio)
        # the scheduler stays unwrapped: accelerate's wrapper steps it once per process
        self.scheduler = build_scheduler(optimizer, args.lr_scheduler_type, warm, total_steps)
        self.model, self.optimizer = self.acc.prepare(trained, optimizer)
        assert_on_device(self.model, self.acc.device, "trained model")
        for module in frozen:
            if module is not None:
                assert_on_device(module, self.acc.device, "frozen model (use place_frozen)")

    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.acc.device)

    def global_sum(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, reduction="sum").item())

    def global_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-key sums over ranks; a rank that saw no batch (fewer units than ranks) adds nothing."""
        if self.world == 1:
            return dict(sums)
        from accelerate.utils import gather_object

        out: dict[str, float] = {}
        for part in gather_object([sums]):
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + float(v)
        return out

    # -- one optimizer step ---------------------------------------------------------
    def accumulate(self, micro: Sequence[Any], loss_fn, scale: float) -> dict[str, float]:
        """Forward and backward of each micro-batch: ``loss_fn(model, item) -> (loss, stats)``.

        The gradient is that of ``sum(loss) * scale`` over this rank's micro-batches, summed over
        ranks (DDP averages, so the loss is multiplied by the world size). Gradients are synced
        once, on the last micro-batch. Returns the summed float statistics, ``loss`` included.
        """
        self.model.train()
        sums: dict[str, float] = {}
        for i, item in enumerate(micro):
            last = i == len(micro) - 1
            sync = (
                contextlib.nullcontext()
                if last or self.world == 1
                else self.acc.no_sync(self.model)
            )
            with sync, self.acc.autocast():
                loss, stats = loss_fn(self.model, item)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(self.nan_message(f"loss is {loss.item()}", i))
                self.acc.backward(loss * (scale * self.world))
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        return sums

    def optimizer_step(self) -> float:
        """Clip the full gradient norm, step the optimizer, clear the gradients; returns the norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.args.max_grad_norm:
            norm = self.acc.clip_grad_norm_(params, self.args.max_grad_norm)
        else:
            grads = [p.grad.detach().norm() for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
        norm = float(norm)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self.nan_message(f"gradient norm is {norm}", None))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def nan_message(self, what: str, micro: int | None) -> str:
        last = self.ckpt.latest()
        where = f" (micro-batch {micro})" if micro is not None else ""
        keep = (
            f"the last good checkpoint {last} is intact"
            if last
            else "no checkpoint was written yet"
        )
        return (
            f"{what} at step {self.step + 1}{where}; training stopped and {keep}. "
            "Lower learning_rate, check the data or the reward, or set max_grad_norm."
        )

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def set_lr_scale(self, scale: float) -> None:
        """Multiply the schedule's base learning rate by ``scale`` from now on (drift restores)."""
        self.lr_scale = scale
        sched = self.scheduler
        sched.base_lrs = [self.args.learning_rate * scale for _ in sched.base_lrs]
        lrs = [
            b * f(sched.last_epoch) for b, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)
        ]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs

    # -- stopping by hand: Ctrl-C or SIGTERM (training/interrupt.py) ------------------
    def stop_requested(self) -> bool:
        """Whether a stop signal arrived on any process: all of them stop after the same step."""
        got = float(signal_received() is not None)
        return self.global_sum(got) > 0 if self.world > 1 else bool(got)

    def stop(self, save) -> TrainingInterrupted:
        """The error that ends a stopped run. ``save()`` first writes a checkpoint of the steps
        taken (unless one is there); ``save=None``: stopped mid-step, nothing more is saved."""
        signum = signal_received() or signal.SIGINT
        what = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        last = self.ckpt.latest()
        if save is not None:
            if last is None or last.name != f"checkpoint-{self.step}":
                save()
            saved = self.out / f"checkpoint-{self.step}"
            return TrainingInterrupted(
                f"{what} at step {self.step} of {self.total_steps}; checkpoint saved in {saved}; "
                "run the same command to resume",
                signum,
            )
        where = f"{what} during step {self.step + 1} of {self.total_steps}"
        if last is None:
            return TrainingInterrupted(f"{where}; nothing was saved (no checkpoint yet)", signum)
        return TrainingInterrupted(
            f"{where}; the steps after {last} were not saved; run the same command to resume "
            "from it",
            signum,
        )

    # -- checkpoints ----------------------------------------------------------------
    def save(self, loop_state: dict | None = None, extra: dict | None = None, rank_extra=None):
        """``checkpoint-{step}``: weights, optimizer, schedule, RNG, ``extra`` and each rank's
        ``rank_extra`` (its RNG is added), written by rank 0 alone."""
        from accelerate.utils import gather_object

        from alignforge.training.checkpoint import rng_state

        mine = {"rng": rng_state(), "extra": rank_extra}
        ranks = gather_object([mine]) if self.world > 1 else [mine]
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"lr_scale": self.lr_scale, **(loop_state or {})}
            blob = {"user": extra or {}, "ranks": ranks}
            self.ckpt.save(self.step, self.unwrapped, self.optimizer, self.scheduler, state, blob)
        self.acc.wait_for_everyone()

    def load(self, path: str | Path) -> tuple[dict, dict, Any]:
        """Restore a checkpoint; returns (loop_state, extra, this rank's rank_extra)."""
        from alignforge.training.checkpoint import set_rng_state

        state, blob = CheckpointManager.load(path, self.unwrapped, self.optimizer, self.scheduler)
        self.step = state["step"]
        self.set_lr_scale(state.get("lr_scale", 1.0))
        ranks = blob.get("ranks") or [{}]
        if len(ranks) != self.world:
            raise RuntimeError(
                f"{path} was written by {len(ranks)} processes; resume it with the same number, not {self.world}"
            )
        mine = ranks[self.rank]
        if mine.get("rng") is not None:
            set_rng_state(mine["rng"])
        return state, blob.get("user", {}), mine.get("extra")

    def resume_path(self, target: str | bool) -> Path | None:
        """The checkpoint a run resumes from (``resume_from_checkpoint``), said on rank 0."""
        if target in ("auto", True):
            path = self.ckpt.latest()
        else:
            path = Path(target) if target else None
        if path is not None and self.acc.is_main_process:
            print(f"resuming from {path.name} ({path})")
        return path

    def progress(self, desc: str):
        enabled = self.args.progress and self.acc.is_main_process
        return _progress(self.total_steps, self.step, enabled, desc)


class TrainLoop(TrainCore):
    """Supervised training over units (examples, pairs): SFT, RM, DPO and SPIN.

    ``objective(model, batch)`` returns the *summed* loss of a micro-batch and summed statistics;
    ``objective.count(batch)`` returns how many units the loss averages over. Each optimizer step
    counts the units of all its micro-batches on all processes and divides every micro-batch's
    summed loss by that global count: the exact mean over the global batch, whatever the split
    into micro-batches or processes.
    """

    def __init__(
        self,
        model,
        objective: Objective,
        train_units: Sequence[Any],
        collate: Callable[[list[Any]], dict],
        args,
        eval_units: Sequence[Any] | None = None,
        accelerator=None,
        callbacks: Sequence[Callable[[TrainLoop, dict], None]] = (),
        frozen=(),
    ):
        acc = accelerator or make_accelerator(args.seed, getattr(args, "mixed_precision", None))
        self.objective, self.collate = objective, collate
        self.train_units, self.eval_units = list(train_units), list(eval_units or [])
        self.callbacks = list(callbacks)
        world = acc.num_processes
        self.per_rank = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.global_batch = self.per_rank * world
        n = len(self.train_units)
        if n < self.global_batch and world > 1:
            raise ValueError(
                f"{n} training units cannot fill one global batch of {self.global_batch}"
            )
        self.steps_per_epoch = max(
            1, n // self.global_batch if world > 1 else math.ceil(n / self.global_batch)
        )
        total = (
            args.max_steps
            if args.max_steps > 0
            else math.ceil(self.steps_per_epoch * args.num_train_epochs)
        )
        super().__init__(model, args, total, acc, frozen)
        self.best_eval, self.bad_evals, self.tokens_seen = math.inf, 0, 0
        self.best_step: int | None = None
        self.best_state: dict | None = (
            None  # trainable weights at best_step (load_best_model_at_end)
        )
        self.stopped_early = False
        # (step, statistics) of the latest evaluation
        self.last_eval: tuple[int, dict] | None = None
        self.resume_extra: dict = {}

    # -- data order: a fixed permutation per epoch, so resuming replays the same batches --
    def step_batches(self, step: int) -> list[dict]:
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        perm = torch.randperm(len(self.train_units), generator=g).tolist()
        chunk = perm[k * self.global_batch : (k + 1) * self.global_batch]
        mine = chunk[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        bs = self.args.per_device_train_batch_size
        return [
            self.collate([self.train_units[i] for i in mine[j : j + bs]])
            for j in range(0, len(mine), bs)
        ]

    def _loss(self, model, batch: dict):
        return self.objective(model, self.to_device(batch))

    def train_step(self, micro: list[dict]) -> dict[str, float]:
        denom = max(self.global_sum(sum(self.objective.count(b) for b in micro)), 1e-12)
        sums = self.accumulate(micro, self._loss, 1.0 / denom)
        grad_norm = self.optimizer_step()
        self.scheduler.step()
        out = {k: v / denom for k, v in self.global_sums(sums).items()}
        out["grad_norm"] = grad_norm
        out["tokens"] = self.global_sum(sum(self.objective.tokens(b) for b in micro))
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Eval loss and statistics over every rank's share; ranks with no share add nothing."""
        if not self.eval_units:
            return None
        self.model.eval()
        was_training = True
        units = self.eval_units[self.rank :: self.world]
        bs = self.args.per_device_eval_batch_size
        sums: dict[str, float] = {}
        count = 0.0
        for j in range(0, len(units), bs):
            batch = self.to_device(self.collate(units[j : j + bs]))
            with self.acc.autocast():  # unwrapped: a DDP forward would wait for the other ranks
                loss_sum, stats = self.objective(self.unwrapped, batch)
            count += self.objective.count(batch)
            for k, v in {"loss": loss_sum, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train(was_training)
        denom = max(self.global_sum(count), 1e-12)
        return {k: v / denom for k, v in self.global_sums(sums).items()}

    def _loop_state(self) -> dict:
        return {
            "best_eval": self.best_eval,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "tokens_seen": self.tokens_seen,
        }

    @property
    def best_file(self) -> Path:
        return self.out / "best" / "trainable.safetensors"

    def resume(self, target: str | bool) -> Path | None:
        path = self.resume_path(target)
        if path is None:
            return None
        state, self.resume_extra, _ = self.load(path)
        self.best_eval, self.bad_evals, self.tokens_seen = (
            state["best_eval"],
            state["bad_evals"],
            state["tokens_seen"],
        )
        self.best_step = state.get("best_step")
        if self.args.load_best_model_at_end and self.best_step is not None:
            from safetensors.torch import load_file

            self.best_state = load_file(self.best_file)
        self.logger.truncate_after(self.step)
        return path

    def save_checkpoint(self, extra: dict | None = None) -> None:
        self.save(self._loop_state(), extra)

    def _after_eval(self, ev: dict) -> None:
        """Log an evaluation; track the best ``metric_for_best_model`` (keeping its weights
        when ``load_best_model_at_end``) and the evaluations since it, for early stopping."""
        self.logger.log({"step": self.step, "split": "eval", **ev})
        self.last_eval = (self.step, ev)
        name, greater = self.args.best_metric
        if name not in ev:
            raise ValueError(
                f"metric_for_best_model: this stage's evaluation reports {sorted(ev)}, not {name!r}"
            )
        value = ev[name] if not greater else -ev[name]  # best_eval is always minimised
        if value < self.best_eval - self.args.early_stopping_threshold:
            self.best_eval, self.best_step, self.bad_evals = value, self.step, 0
            if self.args.load_best_model_at_end:
                self.best_state = trainable_state(self.unwrapped)
                if self.acc.is_main_process:  # survives an interruption, for resume
                    from safetensors.torch import save_file

                    self.best_file.parent.mkdir(exist_ok=True)
                    save_file(self.best_state, self.best_file)
        else:
            self.bad_evals += 1
        patience = self.args.early_stopping_patience
        if patience and self.bad_evals >= patience:
            self.stopped_early = True

    def final_evaluation(self) -> dict | None:
        """Evaluate the final weights; with ``load_best_model_at_end`` and an earlier evaluation
        that was better, restore that one's weights and evaluate them instead (they are what is
        saved and what the final statistics describe). When the last step was just evaluated
        (it stopped early, or ``eval_steps`` divides it), that evaluation is the final one: the
        held-out set is not scored twice."""
        if self.last_eval is not None and self.last_eval[0] == self.step:
            final_eval = self.last_eval[1]
        else:
            final_eval = self.evaluate()
            if final_eval is None:
                return None
            self._after_eval(final_eval)
        if self.best_state is not None and self.best_step != self.step:
            load_trainable_state(self.unwrapped, self.best_state)
            if self.acc.is_main_process:
                print(
                    f"restored the best model, from step {self.best_step} (by {self.args.best_metric[0]})"
                )
            final_eval = self.evaluate()
        return final_eval

    @stoppable
    def fit(self) -> dict:
        resumed = self.resume(self.args.resume_from_checkpoint)
        bar = self.progress("train")
        start, start_tokens = time.time(), self.tokens_seen
        while self.step < self.total_steps and not self.stopped_early:
            stats = self.train_step(self.step_batches(self.step))
            self.step += 1
            self.tokens_seen += int(stats["tokens"])
            tps = (self.tokens_seen - start_tokens) / max(time.time() - start, 1e-9)
            row = {
                "step": self.step,
                "split": "train",
                "epoch": self.step / self.steps_per_epoch,
                "lr": self.lr(),
                "tokens_per_s": tps,
                **stats,
            }
            if self.step % self.args.logging_steps == 0 or self.step == self.total_steps:
                self.logger.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{tps:.0f}")
            if (
                self.args.eval_steps
                and self.step % self.args.eval_steps == 0
                and self.step < self.total_steps
            ):
                if (ev := self.evaluate()) is not None:
                    self._after_eval(ev)
            if self.args.save_steps and self.step % self.args.save_steps == 0:
                self.save_checkpoint()
            for cb in self.callbacks:
                cb(self, row)
            if self.step < self.total_steps and self.stop_requested():
                raise self.stop(self.save_checkpoint)
        bar.close()
        final_eval = self.final_evaluation()
        best = self._best_metric()
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "stopped_early": self.stopped_early,
            "resumed_from": str(resumed) if resumed else None,
            "tokens_trained": self.tokens_seen,
            "train_seconds": time.time() - start,
            "final_eval": final_eval,
            "best_metric": best,
            "best_eval_loss": best["value"] if best and best["name"] == "loss" else None,
        }

    def _best_metric(self) -> dict | None:
        if math.isinf(self.best_eval):
            return None
        name, greater = self.args.best_metric
        value = -self.best_eval if greater else self.best_eval
        restored = self.args.load_best_model_at_end and self.best_state is not None
        return {"name": name, "value": value, "step": self.best_step, "restored": restored}


def _progress(total: int, initial: int, enabled: bool, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True)


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str))
