"""Where rows come from: ``builtin:<name>``, a local .json/.jsonl/.csv/.parquet file, or a
hub dataset by name (through ``datasets``).

    polmctl run recipe=sft data.source=builtin:instructions
    polmctl run recipe=sft data.source=my_rows.jsonl
    polmctl run recipe=sft data.source=HuggingFaceH4/no_robots data.split=train

Rows come back as plain Python dicts, in file order.
"""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

from polmctl.data.builtin import BUILTIN_SOURCES
from polmctl.errors import DataError

FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")


def load_rows(
    source: str,
    split: str = "train",
    *,
    max_rows: int | None = None,
    options: dict | None = None,
    hub_config: str | None = None,
) -> list[dict]:
    """The rows of ``source``'s ``split``, at most ``max_rows`` of them (the first ones).

    ``options`` go to a builtin generator (e.g. ``{"n": 500, "seed": 1}``);
    ``hub_config`` is a hub dataset's config name.
    """
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise DataError(f"{source}: max_rows={max_rows!r}; use a positive integer or None (data.max_rows)")
    if source.startswith("builtin:"):
        rows = _builtin(source.split(":", 1)[1], split, options or {})
    elif options:
        raise DataError(f"{source}: data.options {sorted(options)} only apply to builtin:<name> sources; remove them")
    elif Path(source).suffix.lower() in FILE_TYPES or Path(source).exists():
        rows = _local(Path(source), split)
    else:
        rows = _hub(source, split, hub_config, max_rows)
    if not rows:
        raise DataError(f"{source} (split {split!r}) has no rows; check the file's contents or the split name")
    return rows[:max_rows] if max_rows is not None else rows


def load_config_rows(data, max_rows: int | None = None) -> list[dict]:
    """``load_rows`` of a run's ``data`` config (source, split, options, hub config), at most
    ``max_rows`` rows (default ``data.max_rows``)."""
    return load_rows(
        data.source,
        data.split,
        max_rows=data.max_rows if max_rows is None else max_rows,
        options=dict(data.options) or None,
        hub_config=data.hub_config,
    )


def _builtin(name: str, split: str, options: dict) -> list[dict]:
    if name not in BUILTIN_SOURCES:
        raise DataError(
            f"unknown data source builtin:{name}; builtin sources: {', '.join('builtin:' + n for n in BUILTIN_SOURCES)}"
        )
    generator = BUILTIN_SOURCES[name]
    valid = [p for p in inspect.signature(generator).parameters if p != "split"]
    for key in options:
        if key not in valid:
            raise DataError(
                f"builtin:{name} has no option {key!r} (data.options.{key}); its options: {', '.join(valid)}"
            )
    return generator(split, **options)


def _local(path: Path, split: str) -> list[dict]:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {what}; give the path to a {'/'.join(FILE_TYPES)} file")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_TYPES)}")
    if split != "train":
        raise DataError(
            f"{path} is a single file, so it has only the 'train' split, not {split!r}; point the "
            "evaluation at a held-out file with eval.source=<file>"
        )
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    return _json_rows(path)


def _csv_rows(path: Path) -> list[dict]:
    # Every cell stays text: a completion "4" must not turn into the integer 4.
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: drop a spreadsheet's BOM
            reader = csv.DictReader(f)
            rows = []
            for i, row in enumerate(reader):
                # DictReader files surplus cells under None and fills missing ones with None.
                if None in row or None in row.values():
                    raise DataError(
                        f"{path}: row {i} (line {reader.line_num}) does not have the "
                        f"{len(reader.fieldnames or [])} cells its header names; quote cells "
                        "that contain commas"
                    )
                rows.append(row)
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as UTF-8 CSV ({err})") from None
    return rows


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file; all mean the same
        raise DataError(f"{path}: cannot be read as parquet ({type(err).__name__}: {err})") from None
    # to_pylist keeps nested columns (message lists) as Python lists and dicts.
    return table.to_pylist()


def _json_rows(path: Path) -> list[dict]:
    """A .json file holding a list of objects, or JSON lines (one object a line)."""
    text = path.read_text(encoding="utf-8")
    rows = None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if rows is None:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}: line {lineno} (row {len(rows)}) is not valid JSON ({err.msg}); "
                    "write one JSON object per line, or a .json file with a list of objects"
                ) from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a JSON {type(row).__name__}, not an object with named columns")
    return rows


def _hub(name: str, split: str, config: str | None, max_rows: int | None) -> list[dict]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown id, bad split or config: datasets raises many types
        detail = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
        raise DataError(
            f"cannot load hub dataset {name!r} (config {config!r}, split {split!r}): {detail}. The hub "
            "may be unreachable or the name, config or split wrong; use a local "
            ".json/.jsonl/.csv/.parquet file or a builtin:<name> source"
        ) from None
    if max_rows is not None and len(dataset) > max_rows:
        dataset = dataset.select(range(max_rows))
    return [dict(row) for row in dataset]
