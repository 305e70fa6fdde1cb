"""Run directories: never overwrite a finished run by accident; resume an interrupted one."""

from __future__ import annotations

import shutil
from pathlib import Path

from alignforge.config import ConfigError, save_config


def prepare_output_dir(cfg) -> Path:
    """Create ``cfg.output_dir`` or check that it may be reused, then write the resolved config.

    Reuse is allowed when the directory is empty, holds an unfinished run to resume
    (``resume_from_checkpoint`` not false and a checkpoint present), or ``overwrite_output_dir``.
    """
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()):
        has_ckpt = any(p.name.startswith("checkpoint-") for p in out.iterdir())
        finished = (out / "summary.json").exists()
        if cfg.overwrite_output_dir:
            shutil.rmtree(out)
        elif finished:
            raise ConfigError(
                f"output_dir: {out} already holds a finished run (summary.json); "
                "pass overwrite_output_dir=true or choose another output_dir"
            )
        elif not (has_ckpt and cfg.resume_from_checkpoint):
            raise ConfigError(
                f"output_dir: {out} is not empty and holds no checkpoint to resume; "
                "pass overwrite_output_dir=true or choose another output_dir"
            )
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
