"""The shared training loop, on ``accelerate`` (so ``accelerate launch`` runs it with DDP/FSDP/DeepSpeed).

    loop = TrainLoop(model, objective, train_units, collate, args, eval_units=eval_units)
    summary = loop.fit()

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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from alignforge.training.checkpoint import CheckpointManager
from alignforge.training.optim import build_optimizer, build_scheduler, warmup_steps
from alignforge.training.tracking import MetricsLogger


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left untouched."""


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
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from alignforge.config import ConfigError

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(
            f"accelerate config: {acc.distributed_type.value} is not supported; alignforge trains "
            "data-parallel (DDP). Launch with `torchrun --nproc_per_node N -m alignforge.cli train ...` "
            "or an accelerate config with distributed_type: MULTI_GPU (examples/accelerate/ddp.yaml)."
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


class TrainLoop:
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
    ):
        self.args = args
        self.acc = accelerator or make_accelerator(args.seed)
        self.objective, self.collate = objective, collate
        self.train_units, self.eval_units = list(train_units), list(eval_units or [])
        self.callbacks = list(callbacks)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.per_rank = args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.global_batch = self.per_rank * self.world
        n = len(self.train_units)
        if n < self.global_batch and self.world > 1:
            raise ValueError(
                f"{n} training units cannot fill one global batch of {self.global_batch}"
            )
        self.steps_per_epoch = max(
            1, n // self.global_batch if self.world > 1 else math.ceil(n / self.global_batch)
        )
        self.total_steps = (
            args.max_steps
            if args.max_steps > 0
            else math.ceil(self.steps_per_epoch * args.num_train_epochs)
        )
        self.out = Path(args.output_dir)
        self.ckpt = CheckpointManager(self.out, keep=args.save_total_limit)
        self.logger = MetricsLogger(self.out, args.report_to, enabled=self.acc.is_main_process)
        self.step, self.best_eval, self.bad_evals, self.tokens_seen = 0, math.inf, 0, 0
        self.stopped_early = False
        optimizer = build_optimizer(
            model,
            args.learning_rate,
            args.weight_decay,
            (args.adam_beta1, args.adam_beta2),
            args.adam_epsilon,
        )
        warm = warmup_steps(self.total_steps, args.warmup_steps, args.warmup_ratio)
        scheduler = build_scheduler(optimizer, args.lr_scheduler_type, warm, self.total_steps)
        # the scheduler stays unwrapped: accelerate's wrapper steps it once per process
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.scheduler = scheduler

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

    def _global_sum(self, value: float) -> float:
        t = torch.tensor([float(value)], device=self.acc.device)
        return float(self.acc.reduce(t, reduction="sum").item()) if self.world > 1 else float(value)

    def train_step(self, micro: list[dict]) -> dict[str, float]:
        self.model.train()
        denom = self._global_sum(sum(self.objective.count(b) for b in micro))
        sums: dict[str, float] = {}
        tokens = 0
        for i, batch in enumerate(micro):
            batch = {
                k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()
            }
            sync = i == len(micro) - 1
            ctx = (
                contextlib.nullcontext()
                if sync or self.world == 1
                else self.acc.no_sync(self.model)
            )
            with ctx:
                loss_sum, stats = self.objective(self.model, batch)
                if not torch.isfinite(loss_sum):
                    raise NonFiniteLossError(self._nan_message(f"loss is {loss_sum.item()}", i))
                self.acc.backward(loss_sum * self.world / max(denom, 1e-12))
            for k, v in {"loss": loss_sum, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            tokens += self.objective.tokens(batch)
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: self._global_sum(v) / max(denom, 1e-12) for k, v in sums.items()}
        out["grad_norm"] = grad_norm
        out["tokens"] = self._global_sum(tokens)
        return out

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.args.max_grad_norm:
            norm = self.acc.clip_grad_norm_(params, self.args.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
        norm = float(norm)
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self._nan_message(f"gradient norm is {norm}", None))
        return norm

    def _nan_message(self, what: str, micro: int | None) -> str:
        last = self.ckpt.latest()
        where = f" (micro-batch {micro})" if micro is not None else ""
        keep = (
            f"the last good checkpoint {last} is intact"
            if last
            else "no checkpoint was written yet"
        )
        return f"{what} at step {self.step + 1}{where}; training stopped and {keep}. Lower learning_rate, check the data, or set max_grad_norm."

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if not self.eval_units:
            return None
        self.model.eval()
        units = self.eval_units[self.rank :: self.world]
        bs = self.args.per_device_eval_batch_size
        sums: dict[str, float] = {}
        count = 0.0
        for j in range(0, len(units), bs):
            batch = {
                k: v.to(self.acc.device) if torch.is_tensor(v) else v
                for k, v in self.collate(units[j : j + bs]).items()
            }
            loss_sum, stats = self.objective(self.model, batch)
            count += self.objective.count(batch)
            for k, v in {"loss": loss_sum, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        denom = self._global_sum(count)
        return {k: self._global_sum(v) / max(denom, 1e-12) for k, v in sums.items()}

    def _loop_state(self) -> dict:
        return {
            "best_eval": self.best_eval,
            "bad_evals": self.bad_evals,
            "tokens_seen": self.tokens_seen,
        }

    def resume(self, target: str | bool) -> Path | None:
        path = (
            self.ckpt.latest() if target in ("auto", True) else (Path(target) if target else None)
        )
        if path is None:
            return None
        state, self.resume_extra = CheckpointManager.load(
            path, self.acc.unwrap_model(self.model), self.optimizer, self.scheduler
        )
        self.step = state["step"]
        self.best_eval, self.bad_evals, self.tokens_seen = (
            state["best_eval"],
            state["bad_evals"],
            state["tokens_seen"],
        )
        self.logger.truncate_after(self.step)
        return path

    def save_checkpoint(self, extra: dict | None = None) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.ckpt.save(
                self.step,
                self.acc.unwrap_model(self.model),
                self.optimizer,
                self.scheduler,
                self._loop_state(),
                extra,
            )
        self.acc.wait_for_everyone()

    def _after_eval(self, ev: dict) -> None:
        self.logger.log({"step": self.step, "split": "eval", **ev})
        if ev["loss"] < self.best_eval - self.args.early_stopping_threshold:
            self.best_eval, self.bad_evals = ev["loss"], 0
        else:
            self.bad_evals += 1
        patience = self.args.early_stopping_patience
        if patience and self.bad_evals >= patience:
            self.stopped_early = True

    def fit(self) -> dict:
        resumed = self.resume(self.args.resume_from_checkpoint)
        bar = _progress(
            self.total_steps, self.step, self.args.progress and self.acc.is_main_process
        )
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
                "lr": self.scheduler.get_last_lr()[0],
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
        bar.close()
        final_eval = self.evaluate()
        if final_eval is not None:
            self._after_eval(final_eval)
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "stopped_early": self.stopped_early,
            "resumed_from": str(resumed) if resumed else None,
            "tokens_trained": self.tokens_seen,
            "train_seconds": time.time() - start,
            "final_eval": final_eval,
            "best_eval_loss": None if math.isinf(self.best_eval) else self.best_eval,
        }


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str))
