"""load_rows: builtin sources, local files, hub datasets; round trips and clear errors."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest

from polmctl.data import load_rows
from polmctl.errors import DataError

pytestmark = pytest.mark.unit

# Distinct rows, in an order that sorting would change, with text that looks like numbers.
ROWS = [{"prompt": f"{n} + {n}?", "completion": str(2 * n)} for n in (7, 3, 11, 0, 5)]
MESSAGES = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "answer": str(i)}
    for i in range(3)
]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_round_trip_in_order(tmp_path, suffix):
    path = write(tmp_path / f"rows{suffix}", ROWS)
    assert load_rows(path) == ROWS  # csv cells stay text: "14" is not the integer 14
    assert load_rows(path, max_rows=2) == ROWS[:2]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_conversational_rows_keep_their_message_lists(tmp_path, suffix):
    rows = load_rows(write(tmp_path / f"chat{suffix}", MESSAGES))
    assert rows == MESSAGES and type(rows[0]["messages"]) is list


def test_json_file_may_hold_json_lines(tmp_path):
    (tmp_path / "rows.json").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert load_rows(str(tmp_path / "rows.json")) == ROWS


def test_builtin_source_with_options_and_max_rows():
    rows = load_rows("builtin:arithmetic", "test", options={"n": 30, "seed": 3})
    assert len(rows) == 30
    assert load_rows("builtin:arithmetic", "test", max_rows=5, options={"n": 30, "seed": 3}) == rows[:5]


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(
        DataError, match="builtin:nope; builtin sources: builtin:arithmetic, builtin:instructions, builtin:domain_text"
    ):
        load_rows("builtin:nope")


def test_unknown_generator_option_names_it_and_the_valid_ones():
    with pytest.raises(
        DataError,
        match=r"builtin:arithmetic has no option 'digits' \(data.options.digits\); "
        "its options: n, max_operand, ops, steps, seed",
    ):
        load_rows("builtin:arithmetic", options={"digits": 3})
    with pytest.raises(DataError, match="builtin:domain_text has no option 'ops'.*options: n, seed"):
        load_rows("builtin:domain_text", options={"ops": "+"})


def test_options_for_a_file_are_an_error(tmp_path):
    with pytest.raises(DataError, match=r"rows.jsonl: data.options \['n'\] only apply to builtin"):
        load_rows(write(tmp_path / "rows.jsonl", ROWS), options={"n": 3})


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"data file {tmp_path}/missing.jsonl does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize(
    "name,content",
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "prompt,completion\n"), ("empty.json", "[]")],
)
def test_empty_file_names_source_and_split(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=f"{name} \\(split 'train'\\) has no rows"):
        load_rows(str(tmp_path / name))


def test_a_file_has_only_a_train_split(tmp_path):
    path = write(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(DataError, match="only the 'train' split, not 'test'.*eval.source=<file>"):
        load_rows(path, "test")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": \n', r"bad.jsonl: line 3 \(row 1\) is not valid JSON"),
        ("bad.json", '[{"text": "ok"},]', "bad.json: invalid JSON at line 1"),
        ("list.jsonl", '{"text": "ok"}\n["not", "a", "row"]\n', "list.jsonl: row 1 is a JSON list, not an object"),
        ("ragged.csv", "prompt,completion\na,b\nc,d,e\n", r"ragged.csv: row 1 \(line 3\) does not have the 2 cells"),
        ("rows.txt", "hello\n", "unsupported file type '.txt'"),
        ("broken.parquet", "not parquet", "broken.parquet: cannot be read as parquet"),
    ],
)
def test_malformed_files_name_the_file_and_row(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_rows(str(tmp_path / name))


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/some_set' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError,
        match=r"cannot load hub dataset 'org/some_set' .*ConnectionError.*unreachable or "
        r"the name.*wrong; use a local .*file or a builtin:<name> source",
    ):
        load_rows("org/some_set")


def test_hub_dataset_rows_config_split_and_max_rows(monkeypatch):
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(ROWS if split == "train" else [])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_rows("org/set", hub_config="main", max_rows=3) == ROWS[:3]
    assert calls == [("org/set", "main", "train")]
    with pytest.raises(DataError, match=r"org/set \(split 'test'\) has no rows"):
        load_rows("org/set", "test")


def test_bad_max_rows(tmp_path):
    with pytest.raises(DataError, match="max_rows=0"):
        load_rows(write(tmp_path / "rows.jsonl", ROWS), max_rows=0)
