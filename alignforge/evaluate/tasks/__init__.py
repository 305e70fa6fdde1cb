"""Task registry: ``get_task(name)`` and ``register_task``.

    from alignforge.evaluate.tasks import get_task
    task = get_task("extraction")
    result = task.evaluate(predictions, references)      # TaskResult with bootstrap CIs
    r = task.reward(prediction, reference)                 # the same per-item score, for RL

Built in: ``extraction`` (entities + relations, exact/lenient micro-F1) and ``instruction``
(ROUGE-L / token F1 against a reference). Add your own with ``@register_task("name")`` on a
``Task`` subclass (see ``alignforge.evaluate.tasks.base``) or ``register_task("name", cls)``.
"""

from __future__ import annotations

from typing import Any

from alignforge.evaluate.tasks.base import (
    Example,
    ItemScore,
    Metric,
    Task,
    TaskResult,
    paired_difference,
)
from alignforge.evaluate.tasks.extraction import (
    ExtractionOutput,
    ExtractionTask,
    load_ner_finance,
)
from alignforge.evaluate.tasks.instruction import InstructionTask

_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str, cls: type[Task] | None = None) -> Any:
    """Register ``cls`` under ``name``; usable as ``@register_task("name")``."""

    def add(c: type[Task]) -> type[Task]:
        if not (isinstance(c, type) and issubclass(c, Task)):
            raise TypeError(f"register_task({name!r}): {c!r} is not a Task subclass")
        c.name = name
        _REGISTRY[name] = c
        return c

    return add(cls) if cls is not None else add


def get_task(name: str, **kwargs: Any) -> Task:
    """An instance of the task registered as ``name`` (kwargs go to its constructor)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


register_task("extraction", ExtractionTask)
register_task("instruction", InstructionTask)

__all__ = [
    "Example",
    "ExtractionOutput",
    "ExtractionTask",
    "InstructionTask",
    "ItemScore",
    "Metric",
    "Task",
    "TaskResult",
    "get_task",
    "list_tasks",
    "load_ner_finance",
    "paired_difference",
    "register_task",
]
