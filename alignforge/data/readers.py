"""Read datasets from a local directory, JSONL, JSON, Parquet, or a hub id (when online).

    rows = read_rows("examples/data/alpaca_en_demo.json")       # list[dict]
    rows = read_rows("data/train.parquet")
    rows = read_rows("runs/datagen/sft")                        # datasets.save_to_disk dir or a dir of files

Every error names the file and, for JSONL, the line.
"""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """A dataset file or row is malformed; the message names the file, row and field."""


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
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
    return rows


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


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix in (".csv", ".tsv"):
            import csv

            with open(path, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raise DataError(
        f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)"
    )


def read_rows(source: str | Path, split: str = "train") -> list[dict]:
    """Rows of a dataset as plain dicts, from a file, a directory or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r}; has {', '.join(ds)}")
                ds = ds[split]
            return ds.to_list()
        files = sorted(
            f
            for f in path.iterdir()
            if f.suffix.lower() in (".jsonl", ".json", ".parquet", ".ndjson")
        )
        named = [f for f in files if f.stem == split or f.stem.startswith(split + "-")]
        chosen = named or files
        if not chosen:
            raise DataError(f"{path}: directory holds no .jsonl, .json or .parquet files")
        return [row for f in chosen for row in _read_file(f)]
    if "/" in str(source) and not str(source).startswith((".", "/")) and not path.suffix:
        try:
            import datasets

            return datasets.load_dataset(str(source), split=split).to_list()
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"dataset {source!r}: not a local path, and loading it from the hub failed: {e}"
            ) from e
    raise DataError(f"dataset {source!r}: no such file or directory")
