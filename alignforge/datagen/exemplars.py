"""Pick the few-shot exemplars that maximise a task metric on a dev set.

    from alignforge.datagen.exemplars import select_exemplars
    sel = select_exemplars(pool, dev_inputs, dev_refs, predict=run_prompt, metric=f1, k=4)
    print(sel.indices, sel.scores)       # chosen pool indices and the metric after each pick

``predict(exemplars, inputs) -> predictions`` runs the model with the exemplars in the prompt;
``metric(predictions, references) -> float`` is higher-is-better. Greedy forward selection:
at each of ``k`` steps add the pool item that gives the best metric together with those already
chosen (ties go to the earlier pool item). Cost: about ``k * len(pool)`` calls of ``predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


class ExemplarSelection(NamedTuple):
    exemplars: list[Any]
    indices: list[int]
    scores: list[float]  # metric after each pick
    baseline: float  # metric with no exemplars


def select_exemplars(
    pool: Sequence[Any], dev_inputs: Sequence[Any], dev_references: Sequence[Any], *,
    predict: Callable[[list, Sequence], Sequence], metric: Callable[[Sequence, Sequence], float],
    k: int = 4, stop_when_no_gain: bool = False, progress: bool = False,
) -> ExemplarSelection:  # fmt: skip
    """Greedy forward selection of ``k`` exemplars from ``pool`` (module docstring)."""
    from tqdm.auto import tqdm

    if len(dev_inputs) != len(dev_references):
        raise ValueError(f"{len(dev_inputs)} dev inputs but {len(dev_references)} references")
    if not 0 < k <= len(pool):
        raise ValueError(f"k must be in 1..{len(pool)}, got {k}")

    def score(chosen: list[int]) -> float:
        return float(
            metric(list(predict([pool[i] for i in chosen], dev_inputs)), list(dev_references))
        )

    baseline = score([])
    chosen: list[int] = []
    scores: list[float] = []
    best_so_far = baseline
    for _ in tqdm(range(k), disable=not progress, desc="exemplars"):
        trial = [(score(chosen + [i]), -i) for i in range(len(pool)) if i not in chosen]
        best, neg_i = max(trial)
        if stop_when_no_gain and best <= best_so_far:
            break
        chosen.append(-neg_i)
        scores.append(best)
        best_so_far = max(best_so_far, best)
    return ExemplarSelection([pool[i] for i in chosen], chosen, scores, baseline)
