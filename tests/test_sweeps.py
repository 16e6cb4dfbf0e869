"""Sweeps: grids on Hydra launchers, Optuna search, sweep_summary.json, missing-plugin errors.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_sweeps.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polmctl import sweeps
from polmctl.compose import compose_config
from polmctl.errors import ConfigError
from polmctl.sweeps import missing_plugin, summarize_sweep, sweep_objective, swept_keys
from polmctl.validate import validate

pytestmark = pytest.mark.cli

TINY = ["model=tiny", "debug=quick", "eval=none", "data.max_rows=16", "trainer.max_steps=2", "trainer.save_every=0"]


def polmctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "polmctl", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def job_summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


# -- missing plugins: one line naming the extra, before Hydra runs -----------------------------


def test_missing_plugin_names_the_extra(monkeypatch):
    assert missing_plugin(["recipe=sft", "hydra/launcher=joblib", "hydra/sweeper=optuna"]) is None
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_joblib_launcher", None)  # the import now fails
    message = missing_plugin(["recipe=sft", "hydra/launcher=joblib"])
    assert "hydra_plugins.hydra_joblib_launcher" in message and "pip install 'polmctl[sweeps]'" in message
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert "polmctl[slurm]" in missing_plugin(["hydra/launcher=slurm"])
    assert missing_plugin(["hydra/launcher=basic", "trainer.lr=1e-4"]) is None


def test_ray_launcher_not_installed_is_one_line(tmp_path):
    result = polmctl("run", "-m", "recipe=sft", *TINY, "hydra/launcher=ray", cwd=tmp_path)
    assert result.returncode == 2
    assert "pip install 'polmctl[ray]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "multirun").exists()


# -- the summary, from files ---------------------------------------------------------------


def _fake_job(sweep: Path, num: int, overrides: list[str], summary: dict | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))


def test_summary_ranks_jobs_by_the_metric_and_marks_missing_ones(tmp_path):
    def acc(a):
        return {"status": "completed", "final_loss": 1.0, "eval": {"after": {"arithmetic": {"accuracy": a}}}}

    _fake_job(tmp_path, 0, ["model=tiny", "trainer.lr=1e-4"], acc(0.25))
    _fake_job(tmp_path, 1, ["model=tiny", "trainer.lr=3e-4"], acc(0.75))
    _fake_job(tmp_path, 2, ["model=tiny", "trainer.lr=1e-3"], None)
    summary = summarize_sweep(tmp_path, "eval.after.arithmetic.accuracy", "maximize")
    assert json.loads((tmp_path / "sweep_summary.json").read_text()) == summary
    assert [j["num"] for j in summary["jobs"]] == [0, 1, 2]
    assert summary["best"]["num"] == 1 and summary["best"]["value"] == 0.75
    assert summary["jobs"][2]["status"] == "no summary.json" and summary["jobs"][2]["value"] is None
    assert summary["jobs"][0]["metrics"]["eval.after.arithmetic.accuracy"] == 0.25
    assert swept_keys(summary["jobs"]) == ["trainer.lr"]
    assert summarize_sweep(tmp_path, "eval.after.arithmetic.accuracy", "minimize")["best"]["num"] == 0


# -- real sweeps on model=tiny -------------------------------------------------------------


def test_joblib_grid_2x2_gives_each_job_its_own_run_dir(tmp_path):
    result = polmctl(
        "run",
        "-m",
        "recipe=dpo",
        *TINY,
        "method.beta=0.05,0.1",
        "trainer.lr=1e-5,5e-6",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    runs = job_summaries(sweep)
    assert sorted(runs) == ["0", "1", "2", "3"]
    assert len({r["run_dir"] for r in runs.values()}) == 4

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(summary["jobs"]) == 4 and summary["metric"] == "final_loss"
    grid = {tuple(o for o in j["overrides"] if o.startswith(("method.beta=", "trainer.lr="))) for j in summary["jobs"]}
    assert grid == {(f"method.beta={b}", f"trainer.lr={lr}") for b in ("0.05", "0.1") for lr in ("1e-05", "5e-06")}
    for job in summary["jobs"]:
        assert job["value"] == runs[str(job["num"])]["final_loss"] == job["metrics"]["final_loss"]
    assert summary["best"]["value"] == min(r["final_loss"] for r in runs.values())
    assert "sweep: 4 jobs, best final_loss" in result.stderr and "method.beta" in result.stderr  # the printed table


def test_submitit_local_runs_one_job(tmp_path):
    result = polmctl(
        "run",
        "-m",
        "recipe=sft",
        *TINY,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert job_summaries(sweep)["0"]["status"] == "completed"
    assert any((sweep / ".submitit").iterdir())  # it went through submitit, in its own process
    assert len(json.loads((sweep / "sweep_summary.json").read_text())["jobs"]) == 1


def test_optuna_runs_3_trials_and_reports_the_best(tmp_path):
    result = polmctl(
        "run",
        "-m",
        "recipe=sft",
        *TINY,
        "hydra/sweeper=tune",
        "hydra.sweeper.n_trials=3",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    runs = job_summaries(sweep)
    assert sorted(runs) == ["0", "1", "2"]
    lrs = {(sweep / n / ".hydra" / "overrides.yaml").read_text().split("trainer.lr=")[1].split()[0] for n in runs}
    assert len(lrs) == 3  # three different points of the search space

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = {n: r["final_loss"] for n, r in runs.items()}
    best_job = min(losses, key=losses.get)
    assert best["best_value"] == pytest.approx(losses[best_job])
    overrides = (sweep / best_job / ".hydra" / "overrides.yaml").read_text()
    assert f"trainer.lr={best['best_params']['trainer.lr']}" in overrides
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["best"]["num"] == int(best_job) and summary["optimizer"]["best_value"] == best["best_value"]


def test_optimised_metric_from_an_eval_that_does_not_run_fails_before_training(tmp_path):
    result = polmctl(
        "run",
        "-m",
        "recipe=sft",
        *TINY,
        "hydra/sweeper=tune",
        "hydra.sweeper.n_trials=1",
        "sweep.metric=eval.after.arithmetic.accuracy",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "sweep.metric" in result.stderr and "eval.tasks" in result.stderr and "Traceback" not in result.stderr
    assert not job_summaries(tmp_path / "sweep")


def test_optimised_metric_missing_from_the_summary_lists_the_available_ones(monkeypatch):
    run = validate(compose_config(["recipe=sft", *TINY, "sweep.metric=final_los"]))
    summary = {"final_loss": 0.5, "eval": {"after": {"arithmetic": {"accuracy": 0.25}}}}
    assert sweep_objective(run, summary) is None  # a plain run or a grid: nobody needs it
    monkeypatch.setattr(sweeps, "_optimizing_sweeper", lambda: True)
    with pytest.raises(
        ConfigError, match="'final_los' is not a number.*available: final_loss, eval.after.arithmetic.accuracy"
    ):
        sweep_objective(run, summary)
    run.sweep.metric = "eval.after.arithmetic.accuracy"
    assert sweep_objective(run, summary) == 0.25
