"""Metrics: one JSONL row per log event in ``output_dir/metrics.jsonl``, plus optional trackers."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        report_to: list[str] | str = "jsonl",
        enabled: bool = True,
        run_name: str = "alignforge",
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        targets = [report_to] if isinstance(report_to, str) else list(report_to)
        self.targets = [t for t in targets if t != "none"]
        self._tb = self._wandb = self._mlflow = None
        if not enabled:
            return
        if "tensorboard" in self.targets:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if "wandb" in self.targets:
            import wandb

            self._wandb = wandb.init(project=run_name, dir=str(output_dir), resume="allow")
        if "mlflow" in self.targets:
            import mlflow

            mlflow.start_run(run_name=run_name)
            self._mlflow = mlflow

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        step = row.get("step", 0)
        prefix = row.get("split", "train")
        numeric = {
            f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, int | float) and k != "step"
        }
        if self._tb:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(numeric, step=step)
        if self._mlflow:
            self._mlflow.log_metrics(numeric, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint so the file reads as one clean run."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()
        if self._mlflow:
            self._mlflow.end_run()
