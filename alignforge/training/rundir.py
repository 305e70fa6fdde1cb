"""Run directories: nothing in them is ever deleted; a run resumes only under the config it began with.

``prepare_output_dir(cfg)`` decides what a run may do with ``cfg.output_dir``:

* missing, empty, or holding only what a failed start left (``config.yaml``, empty logs): use it;
* holding an unfinished run (checkpoints, or SPIN's ``iter_k``) and ``resume_from_checkpoint`` not
  false: resume it, after checking that no key that changes training differs from its
  ``config.yaml`` (:func:`config_changes`);
* ``overwrite_output_dir``: the previous run is moved aside to ``<output_dir>.previous-<N>`` (one
  line says where); a folder holding anything alignforge does not write is refused instead;
* anything else is refused with what to do.

The data sources are checked first, so a misspelt ``dataset`` fails before the folder is touched.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import yaml

from alignforge.config import ConfigError, save_config

# What alignforge writes at the top of a run directory (every recipe). Anything else in the folder
# is the user's, so the folder is never moved or reused as a run.
RUN_FILES = (
    "config.yaml", "metrics.jsonl", "summary.json", "final", "best", "checkpoint-*",
    ".tmp-checkpoint-*", "iter_*", "tensorboard", "wandb", "trackers.json", "loss_curve.png", "rewards.png",
    "reward_scores_eval.json", "reward_scores_eval.png", "reward_scores_policy.jsonl",
    "ppo_curves.png", "spin_iterations.png", "rollout_policy",
)  # fmt: skip
# What a run resumes from: checkpoints, or SPIN's iterations.
RESUMABLE = ("checkpoint-*", "iter_*")
# Keys that do not change what is trained: they may differ when a run resumes.
RESUME_SAFE = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "save_steps",
    "save_total_limit", "report_to", "run_name", "progress", "per_device_eval_batch_size",
    "cache_dir", "rollout_base_url", "rollout_model",
}  # fmt: skip
# Keys that set the run's length: they may grow when the learning rate of a step does not depend
# on the length (see :func:`config_changes`).
LENGTH_KEYS = ("max_steps", "num_train_epochs", "num_iterations")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def foreign_entries(out: Path) -> list[str]:
    """Top-level names in ``out`` that alignforge does not write."""
    return sorted(p.name for p in out.iterdir() if not _matches(p.name, RUN_FILES))


def _resumable(out: Path) -> bool:
    return any(_matches(p.name, RESUMABLE) for p in out.iterdir())


def _trained(out: Path) -> bool:
    """Steps were logged (a run that stopped before its first checkpoint)."""
    metrics = out / "metrics.jsonl"
    return metrics.exists() and metrics.stat().st_size > 0


def check_sources(cfg) -> None:
    """``dataset`` and ``eval_dataset`` resolve to data (a file, a folder with the split the run
    reads, a hub id), or a :class:`ConfigError` names the field; no row is read."""
    from alignforge.data.readers import DataError, resolve_source

    for field, split in (("dataset", "train"), ("eval_dataset", "eval")):
        value = getattr(cfg, field, None) or []
        for source in value.split(",") if isinstance(value, str) else value:  # one or several
            try:
                resolve_source(source.strip(), split)
            except DataError as e:
                raise ConfigError(f"{field}: {e}") from None


def move_aside(out: Path) -> Path:
    """Rename ``out`` to the first free ``<out>.previous-<N>`` next to it and say so."""
    n = 1
    while (dest := out.with_name(f"{out.name}.previous-{n}")).exists():
        n += 1
    os.rename(out, dest)
    print(f"overwrite_output_dir: moved the previous contents of {out} to {dest}")
    return dest


def config_changes(saved: dict, new: dict, defaults: dict) -> list[str]:
    """``key: old -> new`` for each key of ``new`` that differs from ``saved`` and changes what
    is trained. A key the saved config lacks (written by an older version) counts as its default.

    ``max_steps``, ``num_train_epochs`` and ``num_iterations`` may grow when no step's learning
    rate depends on them (``lr_scheduler_type: constant`` without ``warmup_ratio``): the steps
    already taken are then exactly those of the longer run. A decaying schedule would give the
    remaining steps learning rates neither run has.
    """
    length_free = new.get("lr_scheduler_type") == "constant" and not new.get("warmup_ratio")
    changes = []
    for key, value in new.items():
        old = saved.get(key, defaults.get(key))
        if key in RESUME_SAFE or old == value:
            continue
        grows = isinstance(old, int | float) and isinstance(value, int | float) and value > old
        if key in LENGTH_KEYS and grows and length_free and (key != "max_steps" or old > 0):
            continue
        changes.append(f"{key}: {old!r} -> {value!r}")
    return changes


def _check_resume(cfg, out: Path) -> None:
    saved_file = out / "config.yaml"
    if not saved_file.exists():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    new = json.loads(cfg.model_dump_json())
    defaults = {
        k: json.loads(json.dumps(f.default, default=str))
        for k, f in type(cfg).model_fields.items()
        if not f.is_required()
    }
    changes = config_changes(saved, new, defaults)
    if changes:
        raise ConfigError(
            f"output_dir: {out} holds a run to resume whose config.yaml differs in keys that "
            "change training:\n  " + "\n  ".join(changes) + "\nTo resume it, drop these "
            "changes; to train with them, choose another output_dir or pass "
            "overwrite_output_dir=true (the run is moved aside, not deleted)."
        )


def prepare_output_dir(cfg) -> Path:
    """Check the data sources, then create, reuse, resume or move aside ``cfg.output_dir`` as the
    module docstring says, and write the resolved config to ``config.yaml``."""
    check_sources(cfg)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()):
        foreign = foreign_entries(out)
        resumable, trained = _resumable(out), _trained(out)
        finished = (out / "summary.json").exists() or (out / "final").exists()
        aside = "choose another output_dir or pass overwrite_output_dir=true (it is moved aside, not deleted)"
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConfigError(
                f"output_dir: {out} holds files alignforge did not write ({shown}); "
                "choose another output_dir (nothing in it is moved or overwritten)"
            )
        if cfg.overwrite_output_dir:
            if out.resolve() in (Path.cwd(), *Path.cwd().parents):
                raise ConfigError(f"output_dir: {out} holds the working directory; choose another")
            move_aside(out)
        elif finished:
            raise ConfigError(
                f"output_dir: {out} already holds a finished run (summary.json); {aside}"
            )
        elif resumable and cfg.resume_from_checkpoint:
            _check_resume(cfg, out)
        elif resumable:
            raise ConfigError(
                f"output_dir: {out} holds a run to resume and resume_from_checkpoint is false; {aside}"
            )
        elif trained:
            raise ConfigError(
                f"output_dir: {out} holds a run that logged steps but saved no checkpoint to "
                f"resume; {aside}"
            )
        # else: only what a failed start wrote (config.yaml, empty logs): start again in it
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def open_run(cfg, prepare=prepare_output_dir):
    """The run's accelerator, with ``output_dir`` prepared (checked, config written) by rank 0
    alone while the other processes wait: ranks never race on the run directory."""
    from alignforge.training.loop import make_accelerator

    acc = make_accelerator(cfg.seed, cfg.mixed_precision)
    if acc.is_main_process:
        prepare(cfg)
    acc.wait_for_everyone()
    return acc
