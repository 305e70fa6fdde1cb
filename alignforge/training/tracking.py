"""Metrics: one JSONL row per log event in ``output_dir/metrics.jsonl``, plus optional trackers.

    logger = MetricsLogger("runs/sft", ["jsonl", "tensorboard"], run_name="sft-lr2e-4",
                           config=cfg.model_dump(mode="json"))
    logger.log({"step": 1, "split": "train", "loss": 2.3})
    logger.close()

Trackers (``report_to``) open on the first row logged, or on ``truncate_after(step)`` when the
run resumes from a checkpoint; then they continue the tracker run this ``output_dir`` logged to
before, whose ids are kept in ``output_dir/trackers.json``:

* ``wandb``: ``wandb.init(name=run_name, config=config, id=..., resume="allow")``; the project is
  ``$WANDB_PROJECT`` or ``alignforge``.
* ``mlflow``: a run named ``run_name`` (``$MLFLOW_TRACKING_URI``, ``$MLFLOW_EXPERIMENT_NAME``) with
  the config flattened into params (``lora.rank``; values cut to mlflow's length limit); a resumed
  run reopens the same run id and adds only params it does not hold yet (mlflow refuses changes).
* ``tensorboard``: ``output_dir/tensorboard``; the config as YAML text at the start, the hparams
  (flattened config against the last value of every metric) at ``close()``. A resumed run writes
  to the same folder with ``purge_step``, so steps logged after the checkpoint are hidden.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name: package
STATE_FILE = "trackers.json"


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": "[1, 2]"}``: nested keys joined by
    dots, lists and other non-scalars as JSON text, scalars (and None) as they are."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif v is None or isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        report_to: list[str] | str = "jsonl",
        enabled: bool = True,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.out = Path(output_dir)
        self.path = self.out / "metrics.jsonl"
        self.enabled = enabled
        targets = [report_to] if isinstance(report_to, str) else list(report_to)
        self.targets = [t for t in targets if t != "none"]
        self.run_name = run_name or self.out.resolve().name
        self.config = dict(config or {})
        self.final: dict[str, float] = {}  # last value of each tracked metric (TensorBoard hparams)
        self._tb = self._wandb = self._mlflow = None
        self._started = False
        missing = [t for t in self.targets if t in TRACKERS and not _installed(TRACKERS[t])]
        if enabled and missing:
            from alignforge.config import ConfigError

            raise ConfigError(
                f"report_to: {missing[0]} needs the {TRACKERS[missing[0]]} package; "
                f"pip install {TRACKERS[missing[0]]}, or remove it from report_to"
            )

    # -- trackers -------------------------------------------------------------------
    def _start(self, resumed_step: int | None) -> None:
        """Open the trackers: new tracker runs, or (``resumed_step``) the ones this output_dir
        logged to before the checkpoint."""
        self._started = True
        state_path = self.out / STATE_FILE
        previous = {}
        if resumed_step is not None and state_path.exists():
            previous = json.loads(state_path.read_text())
        state: dict[str, Any] = {}
        if "tensorboard" in self.targets:
            self._tb = _tensorboard(self.out / "tensorboard", self.config, resumed_step)
            state["tensorboard"] = {"log_dir": str(self.out / "tensorboard")}
        if "wandb" in self.targets:
            self._wandb = _wandb(self.out, self.run_name, self.config, previous.get("wandb"))
            state["wandb"] = {"id": self._wandb.id, "project": self._wandb.project}
        if "mlflow" in self.targets:
            self._mlflow, run_id = _mlflow(self.run_name, self.config, previous.get("mlflow"))
            state["mlflow"] = {"run_id": run_id}
        if state:
            self.out.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps({**previous, **state}, indent=1))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if not self._started:
            self._start(None)
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        step = row.get("step", 0)
        numeric = _numeric(row)
        self.final.update(numeric)
        if self._tb:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(numeric, step=step)
        if self._mlflow:
            self._mlflow.log_metrics(numeric, step=step)

    def truncate_after(self, step: int) -> None:
        """Forget rows logged after ``step`` so the file reads as one clean run: on resume from
        the checkpoint at ``step`` (which also reopens the trackers' runs), or on a restore."""
        if not self.enabled:
            return
        if not self._started:
            self._start(step)
        elif self._tb:  # hide the steps after ``step`` from TensorBoard too
            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = _summary_writer(log_dir, purge_step=step + 1)
        if not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.final = {}
        for r in kept:
            self.final.update(_numeric(r))

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._tb:
            _write_hparams(self._tb, self.config, self.final)
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        if self._mlflow:
            self._mlflow.end_run()
        self._tb = self._wandb = self._mlflow = None


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _numeric(row: dict) -> dict[str, float]:
    """``{"split": "eval", "loss": 0.4}`` -> ``{"eval/loss": 0.4}``: the trackers' metric names."""
    prefix = row.get("split", "train")
    return {
        f"{prefix}/{k}": v
        for k, v in row.items()
        if isinstance(v, int | float) and k not in ("step", "split")
    }


def _summary_writer(log_dir, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)


def _tensorboard(log_dir: Path, config: dict, resumed_step: int | None):
    """A writer on ``log_dir``; a resumed one purges what was logged after ``resumed_step``."""
    import yaml

    writer = _summary_writer(log_dir, None if resumed_step is None else resumed_step + 1)
    if config:  # indented: the text plugin renders Markdown, so YAML goes in as a code block
        text = yaml.safe_dump(config, sort_keys=False)
        writer.add_text("config", "\n".join("    " + line for line in text.splitlines()),
                        global_step=resumed_step or 0)  # fmt: skip
    return writer


def _write_hparams(writer, config: dict, metrics: dict[str, float]) -> None:
    """The hparams plugin's experiment, session start (the flattened config) and end records, in
    the run's own folder, so its metrics are the scalars already logged under those tags."""
    from torch.utils.tensorboard.summary import hparams

    params = {  # long values (lists of modules) cut: the hparams table shows each in a cell
        k: v[:200] if isinstance(v, str) else v for k, v in flatten(config).items() if v is not None
    }
    if not params:
        return
    for summary in hparams(params, {k: v for k, v in metrics.items() if math.isfinite(v)}):
        writer.file_writer.add_summary(summary)
    writer.flush()


def _wandb(output_dir: Path, run_name: str, config: dict, previous: dict | None):
    import wandb

    return wandb.init(
        project=(previous or {}).get("project") or os.environ.get("WANDB_PROJECT", "alignforge"),
        name=run_name,
        dir=str(output_dir),
        config=config,
        id=(previous or {}).get("id"),
        resume="allow" if previous else None,
    )


def _mlflow(run_name: str, config: dict, previous: dict | None):
    """The ``mlflow`` module with a started (or reopened) run, and that run's id."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    nested = mlflow.active_run() is not None  # e.g. a caller's own ``with mlflow.start_run()``
    if previous:
        run = mlflow.start_run(run_id=previous["run_id"], nested=nested)
    else:
        run = mlflow.start_run(run_name=run_name, nested=nested)
    held = mlflow.get_run(run.info.run_id).data.params if previous else {}
    params = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(config).items() if k not in held}
    if params:
        mlflow.log_params(params)
    return mlflow, run.info.run_id
