"""The stage table of a pipeline run (polmctl survey's table.md / table.json, the top of a pipeline's page)."""

from __future__ import annotations

import json
import shutil

import pytest

from polmctl.commands.stage_table import DEFAULT_EVAL_SOURCES, markdown, stage_rows
from polmctl.errors import CommandError
from tests.commands.fake_runs import fake_pipeline, fake_run

pytestmark = pytest.mark.unit


def test_a_stage_that_did_not_measure_before_takes_the_after_of_the_stage_it_started_from(tmp_path):
    rows = stage_rows(fake_pipeline(tmp_path / "p"))
    assert [(r["stage"], r["paradigm"], r["recipe"], r["before"], r["after"], r["before_from"]) for r in rows] == [
        ("1. sft", "fine-tuning", "lora", 0.25, 0.5, "measured"),
        ("2. grpo", "reasoning", "grpo", 0.5, 0.75, "from 1. sft"),
    ]
    first = rows[0]
    assert first["metric"] == "accuracy" and first["held_out"] == "builtin:arithmetic, test split, 12 rows"
    assert first["train_time_s"] == 12.5 and first["wall_time_s"] == 20.25 and first["peak_memory_mb"] == 812.0
    assert first["weights_bytes"] == 4096 and first["adapter"] is False and first["run_dir"] == "1-sft"


def test_a_before_on_other_held_out_rows_is_not_borrowed(tmp_path):
    run = fake_pipeline(tmp_path / "p")
    summary_path = run / "1-sft" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["eval"]["after"]["arithmetic"]["n"] = 100  # the sft stage scored 100 rows, grpo 12
    summary_path.write_text(json.dumps(summary))
    grpo = stage_rows(run)[1]
    assert grpo["before"] is None and grpo["before_from"] is None and grpo["after"] == 0.75


def test_a_merge_reads_its_best_source_and_a_moved_run_dir_still_reads(tmp_path):
    run = fake_pipeline(tmp_path / "p")
    merge = run / "3-merge"
    fake_run(merge, recipe="merge", paradigm="integration", before=None)
    summary = json.loads((merge / "summary.json").read_text())
    sft, grpo = str(run / "1-sft" / "final"), str(run / "2-grpo" / "final")
    summary["eval"] = {
        "merged": {"arithmetic": {"accuracy": 0.6, "n": 12}},
        "sources": {sft: {"arithmetic": {"accuracy": 0.5, "n": 12}}, grpo: {"arithmetic": {"accuracy": 0.7, "n": 12}}},
    }
    (merge / "summary.json").write_text(json.dumps(summary))
    pipeline = json.loads((run / "summary.json").read_text())
    pipeline["stages"].append({"name": "merge", "recipe": "merge", "run_dir": str(merge), "status": "completed"})
    (run / "summary.json").write_text(json.dumps(pipeline))
    moved = tmp_path / "moved"
    shutil.move(run, moved)  # the recorded absolute paths are gone; stages are found by their dir names

    rows = stage_rows(moved)
    assert [r["stage"] for r in rows] == ["1. sft", "2. grpo", "3. merge"]
    assert rows[2]["before"] == 0.7 and rows[2]["after"] == 0.6 and rows[2]["before_from"].startswith("best source")
    assert rows[1]["weights_bytes"] == 4096


def test_the_markdown_has_a_row_per_stage_and_says_where_before_came_from(tmp_path):
    text = markdown(stage_rows(fake_pipeline(tmp_path / "p")), "the survey", "intro line")
    lines = text.splitlines()
    assert lines[0] == "# the survey" and lines[2] == "intro line"
    assert lines[4].startswith("| stage | paradigm | recipe | metric (held-out set) | before -> after |")
    assert lines[6].startswith("| 1. sft | fine-tuning | lora | arithmetic accuracy on builtin:arithmetic")
    assert "| 0.5 -> 0.75 (+0.25) [before: from 1. sft] | 12.5 s | 20.2 s | 812 MB | 4.0 KB |" in lines[7]


def test_a_run_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(CommandError, match="is not a pipeline run"):
        stage_rows(fake_run(tmp_path / "r"))


def test_the_held_out_sets_are_the_eval_tasks_own():
    from polmctl.commands.stage_table import held_out
    from polmctl.evals import EVAL_TASKS

    assert DEFAULT_EVAL_SOURCES == {task: EVAL_TASKS[task][0] for task in DEFAULT_EVAL_SOURCES}
    config = {"data": {"source": "builtin:shapes", "eval_split": "validation"}, "eval": {"source": None}}
    for task, (source, _) in EVAL_TASKS.items():  # those without a fast entry too
        assert held_out(task, config, 5) == f"{source}, test split, 5 rows"
    assert held_out("vqa", config, 5) == "builtin:shapes, validation split, 5 rows"
    assert held_out("arithmetic", {**config, "eval": {"source": "mine.jsonl"}}, None) == "mine.jsonl, test split"
