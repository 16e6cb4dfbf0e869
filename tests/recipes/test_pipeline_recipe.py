"""runner=pipeline end to end on model=tiny: stages run in their own folders and the second uses the
first's output; resume=auto skips what is done and resumes the rest; a stage that fails at run time
stops the pipeline with one line naming it; every shipped pipeline recipe plans all its stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from polmctl.compose import compose_config
from polmctl.runners.pipeline import StageError, plan_stages, run_pipeline
from polmctl.validate import runner_of, validate

pytestmark = pytest.mark.recipes

FAST = ["eval.tasks=[]", "logger.progress=false", "trainer.warmup_ratio=0", "data.max_rows=32"]
SFT = {
    "name": "sft",
    "recipe": "sft",
    "overrides": ["trainer.max_steps=2", "trainer.micro_batch_size=4", "trainer.grad_accum=1"],
}
PRUNE = {
    "name": "prune",
    "recipe": "prune",
    "overrides": ["model.name_or_path=${stage:sft.final}", "method.criterion=magnitude", "method.calibration_rows=8"],
}
SHIPPED = ["compress", "instructgpt", "domain_adaptation", "r1_pipeline"]


def pipeline(run_dir: Path, stages: list[dict], *overrides: str):
    cfg = compose_config(["recipe=domain_adaptation", "model=tiny", f"output_dir={run_dir}", *overrides])
    cfg.method = OmegaConf.merge(cfg.method, {"stages": stages, "common": FAST})
    return validate(cfg)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_two_stages_run_in_their_own_folders_and_a_rerun_skips_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    summary = run_pipeline(pipeline(run_dir, [SFT, PRUNE]))

    sft, prune = run_dir / "1-sft", run_dir / "2-prune"
    assert read(sft / "summary.json")["status"] == "completed" and (sft / "final" / "config.json").exists()
    assert read(prune / "summary.json")["model"] == str(sft / "final")  # the prune stage pruned the sft model
    assert read(prune / "summary.json")["sparsity"]["overall"] == pytest.approx(0.5)
    assert "model.name_or_path=" + str(sft / "final") in OmegaConf.load(prune / ".hydra" / "overrides.yaml")
    written = read(run_dir / "summary.json")
    assert written == json.loads(json.dumps(summary)) and written["status"] == "completed"
    assert [(s["name"], s["recipe"], s["runner"], s["status"]) for s in written["stages"]] == [
        ("sft", "sft", "train", "completed"),
        ("prune", "prune", "prune", "completed"),
    ]
    first = written["stages"][0]
    assert first["run_dir"] == str(sft) and first["final"] == str(sft / "final") and first["wall_time_s"] > 0
    assert first["metrics"]["steps"] == 2 and "final_loss" in first["metrics"] and "eval" in first
    assert written["stages"][1]["metrics"]["params.before"] > 0 and written["final"] == str(prune / "final")
    assert (run_dir / "final").resolve() == (prune / "final").resolve()
    out = capsys.readouterr().err
    assert "domain_adaptation pipeline summary" in out and "2. prune: sparsity" in out

    mtimes = [(d / "summary.json").stat().st_mtime_ns for d in (sft, prune)]
    again = run_pipeline(pipeline(run_dir, [SFT, PRUNE], "resume=auto"))
    assert [(d / "summary.json").stat().st_mtime_ns for d in (sft, prune)] == mtimes
    assert again["status"] == "completed" and again["skipped"] == ["sft", "prune"] and again["resumed"]
    assert [s["skipped"] for s in again["stages"]] == [True, True]
    assert again["stages"][0]["metrics"] == first["metrics"]
    assert "stage 1/2: sft (recipe=sft, runner=train): completed earlier" in capsys.readouterr().err


def test_a_failing_stage_stops_the_pipeline_and_resume_goes_on_from_it(tmp_path):
    run_dir = tmp_path / "run"
    broken = {**PRUNE, "overrides": [*PRUNE["overrides"], "data.source=missing.jsonl"]}  # found out at run time
    with pytest.raises(StageError) as err:
        run_pipeline(pipeline(run_dir, [SFT, broken]))
    message = str(err.value)
    assert "\n" not in message and "stage 2/2 'prune' (recipe=prune) failed" in message
    assert "missing.jsonl" in message and str(run_dir / "2-prune") in message and "resume=auto" in message
    failed = read(run_dir / "summary.json")
    assert failed["status"] == "failed" and failed["failed_stage"] == "prune"
    assert [s["status"] for s in failed["stages"]] == ["completed", "failed"]
    assert "missing.jsonl" in failed["stages"][1]["error"] and (run_dir / "2-prune" / "error.log").exists()

    mtime = (run_dir / "1-sft" / "summary.json").stat().st_mtime_ns
    done = run_pipeline(pipeline(run_dir, [SFT, PRUNE], "resume=auto"))
    assert (run_dir / "1-sft" / "summary.json").stat().st_mtime_ns == mtime
    assert done["status"] == "completed" and done["skipped"] == ["sft"] and done["failed_stage"] is None
    assert [s["status"] for s in done["stages"]] == ["completed", "completed"]
    assert "resume=auto" in OmegaConf.load(run_dir / "2-prune" / ".hydra" / "overrides.yaml")
    assert read(run_dir / "2-prune" / "summary.json")["model"] == str(run_dir / "1-sft" / "final")


def test_resume_continues_an_unfinished_training_stage_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    stages = [{**SFT, "overrides": [*SFT["overrides"], "trainer.save_every=1"]}]
    run_pipeline(pipeline(run_dir, stages))
    (run_dir / "1-sft" / "summary.json").unlink()  # as if the stage had been killed after its checkpoints
    longer = [{**SFT, "overrides": [*SFT["overrides"], "trainer.save_every=1", "trainer.max_steps=3"]}]
    summary = run_pipeline(pipeline(run_dir, longer, "resume=auto"))
    stage = read(run_dir / "1-sft" / "summary.json")
    assert summary["skipped"] == [] and stage["steps"] == 3
    assert stage["resumed_from"] and stage["resumed_from"].endswith("step-2")


@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_pipeline_plans_all_its_stages(tmp_path, recipe):
    run = validate(compose_config([f"recipe={recipe}", "model=tiny", f"output_dir={tmp_path}"]))
    assert runner_of(run) == "pipeline" and run.recipe.name == recipe and run.recipe.paradigm == "integration"
    plan = plan_stages(run)
    names = [s.name for s in run.method.stages]
    assert [p.dir for p in plan] == [tmp_path / f"{i}-{n}" for i, n in enumerate(names, 1)]
    assert plan[0].model == "builtin:tiny"
    for p in plan:
        assert not any("${stage:" in o for o in p.overrides), p.overrides
        if p.index:  # every later stage builds on an earlier one
            assert any(str(tmp_path) in o for o in p.overrides if o.startswith("model.name_or_path=")), p.name
    text = (Path(__file__).parents[2] / "polmctl" / "conf" / "recipe" / f"{recipe}.yaml").read_text().splitlines()
    assert text[0] == "# @package _global_" and text[1] == f"# polmctl run recipe={recipe}"
    assert text[2].startswith("# Paradigm: integration")


def test_compress_distils_from_the_input_model_and_instructgpt_rewards_with_the_rm_stage(tmp_path):
    compress = {
        p.name: p
        for p in plan_stages(
            validate(compose_config(["recipe=compress", "model.name_or_path=builtin:tiny", f"output_dir={tmp_path}"]))
        )
    }
    assert f"model.name_or_path={tmp_path}/1-prune/final" in compress["distill"].overrides
    assert "method.teacher=builtin:tiny" in compress["distill"].overrides
    assert compress["quantize"].model == f"{tmp_path}/2-distill/final"
    instructgpt = {
        p.name: p
        for p in plan_stages(validate(compose_config(["recipe=instructgpt", "model=tiny", f"output_dir={tmp_path}"])))
    }
    assert instructgpt["ppo"].model == instructgpt["rm"].model == f"{tmp_path}/1-sft/final"
    assert f"method.rewards=[{{name: reward_model, path: {tmp_path}/2-rm}}]" in instructgpt["ppo"].overrides


def test_on_the_command_line_a_bad_stage_fails_at_once_and_a_stray_override_is_refused(tmp_path):
    """Under `polmctl run` (a Hydra app) stages compose too; a key no stage reads is one line."""
    env = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}

    def polmctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "polmctl",
                "run",
                "recipe=domain_adaptation",
                "model=tiny",
                f"hydra.run.dir={tmp_path / 'run'}",
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )

    bad = polmctl("method.stages.1.overrides=['trainer.lr=-1']")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "method.stages.1: stage 'sft' (recipe=sft): trainer.lr: must be > 0" in bad.stderr
    assert not (tmp_path / "run" / "1-cpt").exists()
    stray = polmctl("trainer.max_steps=2")
    assert stray.returncode != 0 and "Traceback" not in stray.stderr
    assert "trainer.max_steps=2 reaches no stage" in stray.stderr
    assert "method.common=['trainer.max_steps=2']" in stray.stderr
