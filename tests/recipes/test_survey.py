"""``polmctl survey --quick`` end to end, as a user runs it: killed after its second stage, then resumed
(finished stages skipped); the table has a row per stage with before -> after, and the page exists."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from polmctl.commands.survey import check_request
from polmctl.errors import CommandError

pytestmark = pytest.mark.recipes

RECIPE = Path(__file__).parents[2] / "polmctl" / "conf" / "recipe" / "survey.yaml"
STAGES = [(s["name"], s["recipe"]) for s in yaml.safe_load(RECIPE.read_text())["method"]["stages"]]
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def survey(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polmctl", "survey", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=600,
    )


def test_the_quick_survey_runs_every_paradigm_resumes_after_a_kill_and_writes_its_table_and_page(tmp_path):
    out = tmp_path / "survey-quick"
    first = subprocess.Popen(
        [sys.executable, "-m", "polmctl", "survey", "--quick"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    second_done = out / f"2-{STAGES[1][0]}" / "summary.json"
    deadline = time.monotonic() + 300
    while not second_done.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # killed as a user's Ctrl-\ or a lost machine would
    first.wait()
    assert second_done.exists(), "the survey did not get through its second stage"
    kept = {
        name: (out / f"{i}-{name}" / "summary.json").stat().st_mtime_ns for i, (name, _) in enumerate(STAGES[:2], 1)
    }

    refused = survey("--quick", cwd=tmp_path)  # not over it by accident
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = survey("--quick", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for i, (name, _) in enumerate(STAGES[:2], 1):  # finished before the kill: not run again
        assert (out / f"{i}-{name}" / "summary.json").stat().st_mtime_ns == kept[name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["skipped"]) >= {STAGES[0][0], STAGES[1][0]}
    for i, (name, _) in enumerate(STAGES, 1):
        assert json.loads((out / f"{i}-{name}" / "summary.json").read_text())["status"] == "completed", name

    table = json.loads((out / "table.json").read_text())
    assert table["status"] == "completed" and table["command"].startswith("polmctl survey --quick")
    assert table["model"] == "builtin:tiny" and table["date"] and table["commit"] and table["stages_wall_time_s"] > 0
    rows = table["rows"]
    assert list(dict.fromkeys(r["name"] for r in rows)) == [n for n, _ in STAGES]  # merge: one row per task
    paradigms = {r["paradigm"] for r in rows}
    assert paradigms == {"fine-tuning", "alignment", "reasoning", "efficiency", "integration"}
    for row in rows:  # every stage is scored on held-out rows, before and after
        assert row["status"] == "completed" and row["metric"] and "8 rows" in row["held_out"], row
        assert isinstance(row["after"], float) and isinstance(row["before"], float), row
        assert row["wall_time_s"] > 0 and row["peak_memory_mb"] > 0 and row["weights_bytes"] > 0, row
    by_stage = {(r["name"], r["task"]): r for r in rows}
    assert by_stage[("grpo", "arithmetic")]["before_from"] == "from 1. sft"  # it started from the SFT model
    assert by_stage[("distill", "arithmetic")]["before_from"] == "from 5. prune"
    assert by_stage[("merge", "reversal")]["before_from"] == "from 7. reversal"
    assert by_stage[("dpo", "preference")]["before_from"] == "measured"

    markdown = (out / "table.md").read_text().splitlines()
    for i, (name, recipe) in enumerate(STAGES, 1):
        assert any(line.startswith(f"| {i}. {name} | ") and f"| {recipe} |" in line for line in markdown), name
    page = (out / "report.html").read_text()
    for i, (name, _) in enumerate(STAGES, 1):
        assert f'id="stage-{i}-{name}"' in page
    images = [chunk.split('"', 1)[0] for chunk in page.split('<img src="')[1:]]
    assert len(images) >= 2 * 6  # loss and lr at least, for each of the six stages that train
    assert all(base64.b64decode(uri.split(",", 1)[1])[:4] == b"\x89PNG" for uri in images)
    # Nothing a browser would fetch (a URL inside the recorded config, vllm_server_url's, is text):
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page)
    for line in ("table: survey-quick/table.md", "json: survey-quick/table.json", "page: survey-quick/report.html"):
        assert line in resumed.stdout


def test_the_survey_refuses_what_would_fail_or_overwrite_before_it_runs(tmp_path):
    with pytest.raises(CommandError, match="recipe=lora: the survey is recipe=survey"):
        check_request(tmp_path / "s", False, ["recipe=lora"])
    with pytest.raises(CommandError, match="choose the survey's run dir with --out"):
        check_request(tmp_path / "s", False, ["hydra.run.dir=x"])
    with pytest.raises(CommandError, match="-m: polmctl survey takes"):
        check_request(tmp_path / "s", False, ["-m"])
    with pytest.raises(CommandError, match="holds no survey to go on with"):
        check_request(tmp_path / "s", True, [])
    (tmp_path / "s" / "1-sft").mkdir(parents=True)
    with pytest.raises(CommandError, match="holds a survey already"):
        check_request(tmp_path / "s", False, [])
    check_request(tmp_path / "s", True, ["trainer.device=cpu"])  # going on is fine
