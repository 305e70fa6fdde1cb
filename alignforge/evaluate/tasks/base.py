"""The ``Task`` base: prompt format, per-item scoring, metric and reward from one definition.

A task turns an input row into chat messages, scores one model output against its reference
(``score_item``), and derives from that single function both

* ``evaluate(predictions, references) -> TaskResult``: dataset-level metrics with bootstrap CIs,
* ``reward(prediction, reference) -> float``: the per-item value an RL recipe optimises.

So the reward a PPO run maximises is, by construction, the metric ``alignforge eval`` reports.

A user task in a few lines::

    from alignforge.evaluate.tasks import Task, register_task

    @register_task("yes_no")
    class YesNo(Task):
        system_prompt = "Answer with yes or no only."

        def score(self, prediction: str, reference: str) -> float:
            return float(prediction.strip().lower().startswith(reference.strip().lower()))

    task = get_task("yes_no")
    task.reward("Yes, it is.", "yes")                       # 1.0
    task.evaluate(["yes", "no"], ["yes", "yes"]).metrics["score"].value   # 0.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from alignforge.evaluate.stats import Estimate, bootstrap_ci

Messages = list[dict[str, str]]


class ItemScore(NamedTuple):
    """Score of one prediction: per-item metric values (and additive counts), parse status."""

    values: dict[str, float]
    parsed: bool = True
    error: str | None = None
    detail: dict[str, Any] | None = None


class Metric(NamedTuple):
    """A dataset-level metric: ``statistic`` over per-item rows made of ``columns`` of ``values``.

    The rows (items x columns) are what the bootstrap resamples, e.g. ``("tp", "fp", "fn")`` with
    a micro-F1 statistic, or ``("rouge_l",)`` with the mean.
    """

    name: str
    columns: tuple[str, ...]
    statistic: Callable[[np.ndarray], float]


class Example(NamedTuple):
    """One evaluation item: a stable id, the chat messages to send, and the reference."""

    id: str
    messages: Messages
    reference: Any


class TaskResult(NamedTuple):
    task: str
    n: int
    primary: str
    metrics: dict[str, Estimate]
    breakdown: dict[str, Any]
    parse_failures: int
    items: list[ItemScore]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-item scores left out)."""
        return {
            "task": self.task,
            "n": self.n,
            "primary": self.primary,
            "metrics": {k: v._asdict() for k, v in self.metrics.items()},
            "breakdown": self.breakdown,
            "parse_failures": self.parse_failures,
            "parse_failure_rate": self.parse_failures / self.n if self.n else 0.0,
        }


def mean_of(column: int = 0) -> Callable[[np.ndarray], float]:
    return lambda a: float(np.mean(a[:, column]))


class Task:
    """Base class. Subclasses override ``score`` (one float) or ``score_item`` (several values).

    Class attributes:
      name: registry name (set by ``register_task``).
      system_prompt: prepended as a system message when a row carries plain text.
      primary: the headline metric; ``reward_metric`` (default: ``primary``) is what ``reward``
        returns, so RL optimises the headline metric unless told otherwise.
      output_schema: pydantic model of a structured output, or None for free text.
    """

    name: ClassVar[str] = "task"
    system_prompt: ClassVar[str | None] = None
    primary: ClassVar[str] = "score"
    output_schema: ClassVar[type | None] = None
    prompt_keys: ClassVar[tuple[str, ...]] = ("prompt", "text", "question", "instruction", "input")
    reference_keys: ClassVar[tuple[str, ...]] = ("reference", "output", "answer", "completion")

    def __init__(
        self,
        reward_metric: str | None = None,
        marginal_reward: bool = False,
        marginal_window: int = 64,
    ) -> None:
        self.reward_metric = reward_metric or self.primary
        self.marginal_reward = marginal_reward
        self.marginal_window = marginal_window
        self._recent_rows: np.ndarray | None = None  # the last marginal_window items rewarded

    # ---- prompt format -------------------------------------------------------------------
    def example(self, row: dict[str, Any], index: int) -> Example:
        """Turn an input row into an ``Example``; raises ``ValueError`` naming the row."""
        if not isinstance(row, dict):
            raise ValueError(f"row {index}: expected a JSON object, got {type(row).__name__}")
        rid = str(row.get("id", index))
        reference = next((row[k] for k in self.reference_keys if k in row), None)
        if reference is None:
            raise ValueError(
                f"row {index}: no reference; expected one of the keys {list(self.reference_keys)}"
            )
        return Example(rid, self.prompt(row, index), reference)

    def prompt(self, row: dict[str, Any], index: int = 0) -> Messages:
        """Chat messages for a row: its ``messages`` (up to the last user turn) or its text."""
        if isinstance(row.get("messages"), list):
            msgs = [dict(role=m["role"], content=m["content"]) for m in row["messages"]]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            if not msgs:
                raise ValueError(f"row {index}: 'messages' holds no user turn")
            return msgs
        text = next((row[k] for k in self.prompt_keys if isinstance(row.get(k), str)), None)
        if text is None:
            raise ValueError(
                f"row {index}: no prompt; expected 'messages' or one of {list(self.prompt_keys)}"
            )
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": text}]

    # ---- scoring: the one definition ----------------------------------------------------
    def score(self, prediction: str, reference: Any) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define score() or score_item()")

    def score_item(self, prediction: str, reference: Any) -> ItemScore:
        return ItemScore({"score": float(self.score(prediction, reference))})

    def metrics(self) -> list[Metric]:
        """Dataset-level metrics; default: the mean of the per-item ``primary`` value."""
        return [Metric(self.primary, (self.primary,), mean_of(0))]

    def metric_applies(self, metric: Metric, rows: np.ndarray) -> bool:
        """Whether ``metric`` means anything on these rows (e.g. no relation in any item)."""
        return True

    def breakdown(self, items: Sequence[ItemScore]) -> dict[str, Any]:
        return {}

    def reward(self, prediction: str, reference: Any) -> float:
        """Per-item reward: the ``reward_metric`` value of ``score_item`` (a parse failure is 0)."""
        return float(self.score_item(prediction, reference).values[self.reward_metric])

    def rewards(self, predictions: Sequence[str], references: Sequence[Any]) -> list[float]:
        """Rewards of a batch (e.g. a group of RL rollouts): ``reward`` of each answer, or with
        ``marginal_reward`` what each answer adds to the dataset-level ``reward_metric`` of this
        batch pooled with the ``marginal_window`` items rewarded before it
        (:func:`marginal_values`). The pool keeps the metric at the policy's recent operating
        point: a batch alone often has no true positive, and at F1 = 0 no answer changes it."""
        pairs = list(zip(predictions, references, strict=True))
        if not self.marginal_reward:
            return [self.reward(p, r) for p, r in pairs]
        metric = next((m for m in self.metrics() if m.name == self.reward_metric), None)
        if metric is None:
            raise KeyError(
                f"task {self.name}: marginal_reward needs a dataset metric named {self.reward_metric!r}"
            )
        rows = metric_rows([self.score_item(p, r) for p, r in pairs], metric)
        recent = getattr(self, "_recent_rows", None)
        values = marginal_values(rows, metric.statistic, context=recent)
        pooled = rows if recent is None else np.vstack([recent, rows])
        self._recent_rows = pooled[-self.marginal_window :] if self.marginal_window > 0 else None
        return values.tolist()

    def evaluate(
        self,
        predictions: Sequence[str],
        references: Sequence[Any],
        n_boot: int = 2000,
        alpha: float = 0.05,
        seed: int = 0,
    ) -> TaskResult:
        if len(predictions) != len(references):
            raise ValueError(
                f"evaluate: {len(predictions)} predictions but {len(references)} references"
            )
        items = [self.score_item(p, r) for p, r in zip(predictions, references, strict=True)]
        return self.aggregate(items, n_boot=n_boot, alpha=alpha, seed=seed)

    def aggregate(
        self, items: Sequence[ItemScore], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
    ) -> TaskResult:
        if not items:
            raise ValueError(f"task {self.name}: nothing to evaluate (0 items)")
        metrics = {}
        for m in self.metrics():
            rows = metric_rows(items, m)
            if self.metric_applies(m, rows):
                metrics[m.name] = bootstrap_ci(rows, m.statistic, n_boot, alpha, seed)
        failures = sum(not it.parsed for it in items)
        return TaskResult(
            self.name,
            len(items),
            self.primary,
            metrics,
            self.breakdown(items),
            failures,
            list(items),
        )


def marginal_values(
    rows: np.ndarray, statistic: Callable[[np.ndarray], float], context: np.ndarray | None = None
) -> np.ndarray:
    """What each item adds to a dataset metric: ``v_i = n * (M(pool) - M(pool, row i zeroed))``.

    The pool is ``context`` (rows of earlier items, which get no value of their own) and
    ``rows``; ``n`` is its size. ``M`` of rows that are all zero is taken as 0 (nothing counted,
    nothing earned). For a mean of per-item scores ``v_i`` is item i's own score. For micro-F1
    over (TP, FP, FN) rows it is the item's effect on the pooled F1: at F1 = 2TP/S
    (S = 2TP + FP + FN) one more true positive is worth about (2 - 2 F1) / F1 false positives or
    negatives, so while F1 is low a correct entity earns far more than a wrong one costs, and an
    item that counts nothing (no gold, no prediction) gets exactly 0, as it adds nothing to the
    corpus metric. A per-item F1, which gives such an item 1.0, is not the corpus metric.

    Example: rows (TP, FP, FN) = [1,0,0], [0,1,0], [0,0,0]: M = 2/3;
    without row 0: M(0,1,0) = 0 -> v_0 = 3 * 2/3 = 2; without row 1: M(1,0,0) = 1 -> v_1 = -1; v_2 = 0.
    """

    def value(a: np.ndarray) -> float:
        return float(statistic(a)) if a.any() else 0.0

    rows = np.asarray(rows, dtype=float)
    k = 0 if context is None else len(context)
    pool = rows if context is None else np.vstack([np.asarray(context, dtype=float), rows])
    full, n = value(pool), len(pool)
    out = np.empty(len(rows))
    for i in range(len(rows)):
        zeroed = pool.copy()
        zeroed[k + i] = 0.0
        out[i] = n * (full - value(zeroed))
    return out


def metric_rows(items: Sequence[ItemScore], metric: Metric) -> np.ndarray:
    """(items x len(columns)) array the bootstrap resamples for ``metric``."""
    return np.array([[it.values[c] for c in metric.columns] for it in items], dtype=float)


def paired_difference(
    task: Task,
    items_a: Sequence[ItemScore],
    items_b: Sequence[ItemScore],
    metric: str | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Estimate:
    """metric(A) - metric(B) with a paired bootstrap CI (the same items resampled for both)."""
    name = metric or task.primary
    m = next((m for m in task.metrics() if m.name == name), None)
    if m is None:
        raise KeyError(f"task {task.name} has no metric {name!r}")
    if len(items_a) != len(items_b):
        raise ValueError("paired_difference: both systems must be scored on the same items")
    a, b = metric_rows(items_a, m), metric_rows(items_b, m)
    k = a.shape[1]
    return bootstrap_ci(
        np.hstack([a, b]),
        lambda x: m.statistic(x[:, :k]) - m.statistic(x[:, k:]),
        n_boot,
        alpha,
        seed,
    )
