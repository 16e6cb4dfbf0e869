"""Where rows come from: ``builtin:<name>``, a local .json/.jsonl/.csv/.parquet file, or a
hub dataset by name (through ``datasets``).

    polmctl run recipe=sft data.source=my_rows.jsonl
    polmctl run recipe=sft data.source=HuggingFaceH4/no_robots data.split=train
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from polmctl.data.builtin import BUILTIN_SOURCES
from polmctl.data.errors import DataError

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(source: str, split: str = "train", *, max_rows: int | None = None, options: dict | None = None,
              hub_config: str | None = None) -> list[dict]:
    if source.startswith("builtin:"):
        rows = _builtin(source.split(":", 1)[1], split, options or {})
    elif Path(source).suffix.lower() in FILE_TYPES or Path(source).exists():
        rows = _local(Path(source), split)
    else:
        rows = _hub(source, split, hub_config)
    if not rows:
        raise DataError(f"{source} (split {split}) has no rows; check the file or the split name")
    return rows[:max_rows] if max_rows else rows


def _builtin(name: str, split: str, options: dict) -> list[dict]:
    if name not in BUILTIN_SOURCES:
        raise DataError(f"unknown builtin data source builtin:{name}; builtin sources: "
                        f"{', '.join('builtin:' + n for n in BUILTIN_SOURCES)}")
    generator = BUILTIN_SOURCES[name]
    valid = [p for p in inspect.signature(generator).parameters if p != "split"]
    for key in options:
        if key not in valid:
            raise DataError(f"builtin:{name} has no option {key!r} (data.options.{key}); its options: {', '.join(valid)}")
    return generator(split, **options)


def _local(path: Path, split: str) -> list[dict]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist; give a path to a .json/.jsonl/.csv/.parquet file")
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_TYPES)}")
    if split != "train":
        raise DataError(f"{path} is a single file, so it has no {split!r} split; point the evaluation at a "
                        "held-out file with eval.source=<file>")
    if kind == "json":
        return _json_rows(path)
    import pandas as pd

    try:
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas raises many parser types; all mean the same to a user
        raise DataError(f"{path}: cannot be read as {kind} ({type(err).__name__}: {err})") from None
    return frame.to_dict(orient="records")


def _json_rows(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno} (row {len(rows)}) is not valid JSON: {err.msg}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a {type(row).__name__}, not an object with named columns")
    return rows


def _hub(name: str, split: str, config: str | None) -> list[dict]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown id, bad split: datasets raises many types
        raise DataError(f"cannot load hub dataset {name!r} (split {split}): {type(err).__name__}; the hub may be "
                        "unreachable or the name wrong. Use a local file or a builtin:<name> source") from None
    return [dict(row) for row in dataset]
