"""`polmctl data inspect | filter | raft` as a user types them (in-process, through the Typer app)."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from polmctl.cli import app
from polmctl.data import detect_format, encode_dataset, load_rows
from polmctl.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.cli

ROWS = [
    {"prompt": "What is the capital of France?", "completion": "Paris is the capital of France."},
    {"prompt": "Name a primary colour.", "completion": "Red is a primary colour."},
    {"prompt": "What is the capital of France?", "completion": "Paris is the capital of France."},
    {"prompt": "what is the capital of france?", "completion": "Paris is the capital of France!"},
    {"prompt": "Translate 'cat' to French.", "completion": "Chat."},
    {"prompt": "Tell a long story.", "completion": "Once upon a time " * 40},
]


def polmctl(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture()
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_filter_writes_the_kept_rows_and_a_report_naming_each_drop(tmp_path, rows_file):
    out = tmp_path / "kept.jsonl"
    result = polmctl(
        "data", "filter", str(rows_file), "--out", str(out), "--model", "builtin:tiny",
        "--dedup", "--near-dedup", "0.8", "--max-tokens", "300",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kept 3 of 6 rows" in result.output
    kept = load_rows(str(out))
    assert kept == [ROWS[0], ROWS[1], ROWS[4]] and detect_format(kept[0], "kept") == "prompt_completion"
    assert encode_dataset(kept, build_tiny_tokenizer(), source="kept")[1].kept == 3
    report = json.loads((tmp_path / "kept.report.json").read_text())
    assert report["rows"] == 6 and report["kept"] == 3
    assert {d["row"]: d["reason"] for d in report["dropped"]} == {
        2: "exact_duplicate",
        3: "near_duplicate",
        5: "length",
    }


def test_filter_reads_csv_and_builtin_sources(tmp_path):
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS[:3])
    out = tmp_path / "kept.jsonl"
    assert polmctl("data", "filter", str(path), "--out", str(out), "--dedup").exit_code == 0
    assert load_rows(str(out)) == ROWS[:2]
    result = polmctl(
        "data", "filter", "builtin:arithmetic", "--option", "n=40", "--out", str(out), "--dedup",
        "--ifd-top", "0.5", "--model", "builtin:tiny",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(load_rows(str(out))) == 20
    assert set(load_rows(str(out))[0]) == set(load_rows("builtin:arithmetic", options={"n": 1})[0])


def test_inspect_prints_counts_lengths_duplicates_and_writes_the_plot(tmp_path, rows_file):
    png = tmp_path / "lengths.png"
    result = polmctl("data", "inspect", str(rows_file), "--model", "builtin:tiny", "--plot", str(png))
    assert result.exit_code == 0, result.output
    for needle in ("prompt_completion", "exact duplicate rows", "near duplicates (>= 0.8)", "answer tokens"):
        assert needle in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads(
        polmctl("data", "inspect", str(rows_file), "--model", "builtin:tiny", "--no-plot", "--json").output
    )
    assert stats["rows"] == 6 and stats["exact_duplicates"]["groups"] == [[0, 2]]
    assert stats["near_duplicates"]["pairs"][0][:2] == [0, 3]


def test_raft_writes_sft_rows(tmp_path):
    docs, qa, out = tmp_path / "docs.jsonl", tmp_path / "qa.jsonl", tmp_path / "raft.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"Item {i} weighs {i} grams."}) + "\n" for i in range(6))
    )
    qa.write_text(
        "".join(
            json.dumps({"question": f"Weight of item {i}?", "answer": f"{i} grams", "doc_id": f"d{i}"}) + "\n"
            for i in range(6)
        )
    )
    result = polmctl("data", "raft", str(qa), str(docs), "--out", str(out), "--distractors", "2", "--p-oracle", "0.5")
    assert result.exit_code == 0, result.output
    rows = load_rows(str(out))
    assert len(rows) == 6 and sum(r["oracle_in_context"] for r in rows) == 3
    assert detect_format(rows[0], "raft") == "prompt_completion"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["data", "filter", "missing.jsonl", "--out", "k.jsonl", "--dedup"], "missing.jsonl does not exist"),
        (["data", "filter", "ROWS", "--out", "k.csv", "--dedup"], "write the kept rows to a .jsonl file"),
        (["data", "filter", "ROWS", "--out", "k.jsonl", "--near-dedup", "2"], "--near-dedup=2.0"),
        (["data", "filter", "ROWS", "--out", "k.jsonl", "--min-reward", "0"], "--reward-model and --min-reward"),
        (["data", "inspect", "ROWS", "--option", "n"], "write KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line_with_how_to_fix_it(tmp_path, rows_file, args, needle):
    args = [str(rows_file) if a == "ROWS" else (str(tmp_path / a) if a.startswith("k.") else a) for a in args]
    result = polmctl(*args)
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output
