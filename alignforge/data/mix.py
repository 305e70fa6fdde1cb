"""Several datasets mixed into one, under LLaMA-Factory's names (``mix_strategy``,
``interleave_probs``).

    rows = mix_rows([rows_a, rows_b], ["a.jsonl", "b.jsonl"], "interleave_under", [0.7, 0.3], seed=42)
    rows.where(5)        # "b.jsonl:3": the file and line of the 6th mixed row

``concat`` keeps every row of each dataset, one dataset after the other. The interleave
strategies draw each next row's dataset in turn (no ``probs``) or at random by ``probs``:
``interleave_under`` stops as soon as one dataset runs out (the others are undersampled),
``interleave_over`` once every dataset has run out at least once (an exhausted one starts again:
the smaller ones are oversampled). The drawing is 🤗 datasets' ``interleave_datasets`` run on
each row's (dataset, index), so it is the library's own, deterministic under ``seed``, and the
rows themselves never pass through Arrow (their columns need not share one schema).
"""

from __future__ import annotations

from alignforge.data.readers import DataError, Rows

STRATEGIES = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}


def _origin(rows: list[dict], name: str, idx: int) -> str:
    """Where row ``idx`` of dataset ``name`` is: its file and line when ``rows`` knows."""
    return rows.where(idx) if isinstance(rows, Rows) else f"{name} row {idx}"


def row_name(rows: list[dict], idx: int, source: str) -> str:
    """``"a.jsonl:4"``: row ``idx`` of ``rows`` named by where it came from when ``rows``
    knows (:class:`Rows`), else by ``source``."""
    return rows.where(idx) if isinstance(rows, Rows) else f"{source} row {idx}"


def mix_rows(
    parts: list[list[dict]],
    names: list[str],
    strategy: str = "concat",
    probs: list[float] | None = None,
    seed: int = 42,
) -> Rows:
    """One dataset out of ``parts`` (the rows of the datasets called ``names``), mixed as
    ``strategy`` says (the module docstring)."""
    for rows, name in zip(parts, names, strict=True):
        if not rows:
            raise DataError(f"{name}: holds no rows")
    if strategy == "concat" or len(parts) == 1:
        order = [(k, i) for k, rows in enumerate(parts) for i in range(len(rows))]
    elif strategy in STRATEGIES:
        import datasets

        index = [
            datasets.Dataset.from_dict({"part": [k] * len(rows), "row": list(range(len(rows)))})
            for k, rows in enumerate(parts)
        ]
        mixed = datasets.interleave_datasets(
            index, probabilities=probs, seed=seed, stopping_strategy=STRATEGIES[strategy]
        )
        order = list(zip(mixed["part"], mixed["row"], strict=True))
    else:
        raise DataError(
            f"mix_strategy: {strategy!r}; use concat, interleave_under or interleave_over"
        )
    return Rows([parts[k][i] for k, i in order], [_origin(parts[k], names[k], i) for k, i in order])
