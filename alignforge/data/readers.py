"""Read datasets from a local directory, JSONL, JSON, Parquet, or a hub id (when online).

    rows = read_rows("examples/data/alpaca_en_demo.json")       # list[dict]
    rows = read_rows("data/train.parquet")
    rows = read_rows("runs/datagen/sft")                        # datasets.save_to_disk dir or a dir of files
    held_out = read_rows("runs/datagen/sft", split="eval")      # its test, validation or eval split

A folder is read by split: ``train.jsonl`` and ``test.jsonl`` are two splits, never one dataset.
Every error names the file and, for JSONL, the line. The rows remember where each came from
(:class:`Rows`): ``rows.where(i)`` is ``"data/train.jsonl:150"`` (the line in the file) for
JSONL and CSV, ``"data/train.parquet row 149"`` (the row index) for JSON, Parquet and 🤗 datasets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignforge.errors import UserError


class DataError(UserError, ValueError):
    """A dataset file or row is malformed; the message names the file, row and field."""


class Rows(list):
    """Rows that remember where each came from, so an error can name the row in its file:
    ``origins[i]`` is ``"file.jsonl:LINE"`` or ``"file.parquet row INDEX"``."""

    def __init__(self, rows: list[dict], origins: list[str]):
        super().__init__(rows)
        self.origins = list(origins)

    def where(self, idx: int) -> str:
        return self.origins[idx]

    def select(self, indices) -> Rows:
        indices = list(indices)
        return Rows([self[i] for i in indices], [self.origins[i] for i in indices])


def _indexed(rows: list[dict], name) -> Rows:
    return Rows(rows, [f"{name} row {i}" for i in range(len(rows))])


def _read_jsonl(path: Path) -> Rows:
    rows, lines = [], []
    with open(path, encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
            lines.append(f"{path}:{lineno}")
    return Rows(rows, lines)


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        for key in ("data", "rows", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a list of objects (or {{'data': [...]}})")
    return data


def _read_file(path: Path) -> Rows:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".json":
            return _indexed(_read_json(path), path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return _indexed(pq.read_table(path).to_pylist(), path)
        if suffix in (".csv", ".tsv"):
            import csv

            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                rows, lines = [], []
                for row in reader:  # line_num: the line the record ends on
                    rows.append(row)
                    lines.append(f"{path}:{reader.line_num}")
                return Rows(rows, lines)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raise DataError(
        f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)"
    )


# Split names as 🤗 datasets reads them from data file names (its ``SPLIT_KEYWORDS``), with
# ``eval`` kept apart from ``test``. A name holding one of these words, between separators
# (``train.jsonl``, ``train-00000-of-00002.parquet``, ``alpaca_dev.json``), belongs to its split.
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
    "eval": ("eval", "evaluation"),
}
HELD_OUT = ("test", "validation", "eval")  # what ``split="eval"`` (an eval_dataset) reads
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".ndjson")


def split_names(name: str) -> list[str]:
    """The splits a file stem or split key names: ``"train-00000-of-00002"`` -> ``["train"]``."""
    words = {w for w in re.split(r"[-_. 0-9]+", name.lower()) if w}
    return [s for s, keys in SPLIT_WORDS.items() if words & set(keys)]


def _pick(groups: dict[str, list], split: str, where: Path, have: list[str]) -> list:
    """The group of ``split``; ``"eval"`` takes the one held-out split there is."""
    named = split_names(split)
    want = HELD_OUT if split == "eval" else (named[0] if len(named) == 1 else split,)
    present = [s for s in want if s in groups]
    if not present:
        what = (
            "held-out split (test, validation or eval)" if split == "eval" else f"split {split!r}"
        )
        raise DataError(f"{where}: no {what}; has {', '.join(have)}")
    if len(present) > 1:
        raise DataError(
            f"{where}: holds more than one held-out split ({', '.join(present)}); "
            "point at the one you mean"
        )
    return groups[present[0]]


def _split_files(path: Path, split: str) -> list[Path]:
    """The data files of ``split`` in a folder; a folder whose files name no split is one dataset."""
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DataError(f"{path}: directory holds no .jsonl, .json or .parquet files")
    groups: dict[str, list[Path]] = {}
    unnamed = []
    for f in files:
        names = split_names(f.stem)
        if len(names) > 1:
            raise DataError(f"{f}: the name reads as splits {', '.join(names)}; rename it")
        if names:
            groups.setdefault(names[0], []).append(f)
        else:
            unnamed.append(f.name)
    if not groups:
        return files
    if unnamed:
        raise DataError(
            f"{path}: no split in the name of {', '.join(unnamed)}, while other files name one "
            f"({', '.join(f.name for g in groups.values() for f in g)}); rename them "
            "(train, test, validation) or point at a file"
        )
    return _pick(groups, split, path, [f.name for f in files])


def _split_key(keys: list[str], split: str, where: Path) -> str:
    """The key of ``split`` among a DatasetDict's split keys."""
    if split in keys:
        return split
    groups: dict[str, list[str]] = {}
    for k in keys:
        names = split_names(k)
        groups.setdefault(names[0] if len(names) == 1 else k, []).append(k)
    chosen = _pick(groups, split, where, keys)
    if len(chosen) > 1:
        raise DataError(f"{where}: splits {', '.join(chosen)} all read as {split!r}; point at one")
    return chosen[0]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _looks_like_hub_id(source: str, path: Path) -> bool:
    return "/" in source and not source.startswith((".", "/", "~")) and not path.suffix


def resolve_source(source: str | Path, split: str = "train"):
    """Where the rows of ``split`` are, without reading a row: a list of files, a
    ``(save_to_disk folder, split key or None)`` pair, or a hub id (a string, not checked here).

    ``split`` is a split name (``train``, ``test``, ``validation``; their aliases ``dev``,
    ``valid``...) or ``"eval"``: the one held-out split (test, validation or eval) a source has.
    A folder of files is read by split when its file names carry split names; a DataError says
    when the wanted split is missing or there is more than one.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        if not _is_saved_dataset(path):
            return _split_files(path, split)
        if not (path / "dataset_dict.json").exists():
            return path, None
        keys = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return path, _split_key(keys, split, path)
    if _looks_like_hub_id(str(source), path):
        return str(source)
    raise DataError(f"{source}: no such file or directory")


def read_rows(source: str | Path, split: str = "train") -> Rows:
    """Rows of ``split`` of a dataset as plain dicts, from a file, a folder or a hub id
    (:func:`resolve_source` says which files or split), each knowing where it came from."""
    where = resolve_source(source, split)
    if isinstance(where, list):
        parts = [_read_file(f) for f in where]
        return Rows([r for p in parts for r in p], [o for p in parts for o in p.origins])
    import datasets

    if isinstance(where, tuple):
        path, key = where
        ds = datasets.load_from_disk(str(path))
        ds = ds[key] if key is not None else ds
        return _indexed(ds.to_list(), f"{path} ({key})" if key is not None else path)
    try:
        ds = datasets.load_dataset(where)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_split_key(list(ds), split, Path(where))]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"dataset {source!r}: not a local path, and loading it from the hub failed: {e}"
        ) from e
    return _indexed(ds.to_list(), source)
