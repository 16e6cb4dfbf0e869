"""Which held-out rows a task reads: its builtin set's test split, or eval.source."""

from __future__ import annotations

import json

import pytest

from polmctl.config.schema import DataConfig, EvalConfig
from polmctl.evals import eval_rows

pytestmark = pytest.mark.unit


def test_a_local_file_as_eval_source_is_read_whole(tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = eval_rows("arithmetic", EvalConfig(source=str(held_out)), DataConfig(source="builtin:arithmetic"))
    assert [r["answer"] for r in got] == ["1", "2", "3", "4", "5"]


def test_without_eval_source_a_task_reads_its_builtin_test_split():
    test = eval_rows("arithmetic", EvalConfig(max_samples=4), DataConfig(source="builtin:reversal"))
    train = eval_rows("arithmetic", EvalConfig(max_samples=4, source="builtin:arithmetic"), DataConfig())
    assert len(test) == 4 and all("answer" in r for r in test)
    assert [r["answer"] for r in test] == [r["answer"] for r in train]  # both the test split
