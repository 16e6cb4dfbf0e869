"""Pipelines without running a model: the method node, ${stage:NAME.KEY} references, what each stage
is composed from, and a bad stage caught before any stage runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from polmctl.compose import compose_config, compose_validated
from polmctl.errors import ConfigError
from polmctl.methods.pipeline import PipelineMethod, Stage, references, resolve, stage_overrides
from polmctl.methods.registry import METHODS
from polmctl.runners import RUNNERS
from polmctl.runners.pipeline import plan_stages, run_pipeline
from polmctl.validate import validate

pytestmark = pytest.mark.unit

SFT = {"name": "sft", "recipe": "sft", "overrides": ["trainer.max_steps=2"]}
PRUNE = {"name": "prune", "recipe": "prune", "overrides": ["model.name_or_path=${stage:sft.final}"]}


def pipeline_cfg(tmp_path, stages, common=(), *overrides):
    """A validated pipeline RunConfig with these stages (the recipe's own stages replaced)."""
    cfg = compose_config(["recipe=domain_adaptation", "model=tiny", f"output_dir={tmp_path}", *overrides])
    cfg.method = OmegaConf.merge(cfg.method, {"stages": stages, "common": list(common)})
    return validate(cfg)


def test_pipeline_is_registered_as_runner_and_method():
    assert METHODS["pipeline"].schema is PipelineMethod and PipelineMethod().name == "pipeline"
    assert METHODS["pipeline"].runner == "pipeline"
    assert RUNNERS["pipeline"] is run_pipeline


def test_references_are_parsed_and_resolved():
    text = "method.rewards=[{name: reward_model, path: ${stage:rm.dir}}]"
    assert references(text) == [("rm", "dir")]
    assert references("a=${stage:sft.final} b=${stage:x.model}") == [("sft", "final"), ("x", "model")]
    outputs = {"rm": {"dir": "/runs/p/2-rm", "final": "/runs/p/2-rm/final", "model": "builtin:tiny"}}
    assert resolve(text, outputs) == "method.rewards=[{name: reward_model, path: /runs/p/2-rm}]"
    assert resolve("model.name_or_path=${stage:rm.final}", outputs) == "model.name_or_path=/runs/p/2-rm/final"
    # A whole value that Hydra's grammar would misread is quoted.
    spaced = {"rm": {"final": "/my runs/p/2-rm/final"}}
    assert resolve("model.name_or_path=${stage:rm.final}", spaced) == "model.name_or_path='/my runs/p/2-rm/final'"
    with pytest.raises(ConfigError, match=r"method.stages.1.overrides.0: \$\{stage:sfx.final\}.*known: rm"):
        resolve("model.name_or_path=${stage:sfx.final}", outputs, "method.stages.1.overrides.0")


def test_a_reference_survives_composition_and_validation_as_text(tmp_path):
    run = pipeline_cfg(tmp_path, [SFT, PRUNE])
    assert run.method.stages[1] == Stage("prune", "prune", ["model.name_or_path=${stage:sft.final}"])
    _, text = compose_validated(["recipe=instructgpt"])  # `polmctl show` prints the references as written
    assert "model.name_or_path=${stage:sft.final}" in text and "path: ${stage:rm.dir}" in text


@pytest.mark.parametrize(
    "stages,common,key,needle",
    [
        (
            [SFT, {**PRUNE, "overrides": ["model.name_or_path=${stage:sfx.final}"]}],
            [],
            "method.stages.1.overrides.0",
            r"\$\{stage:sfx.final\} in stage 'prune': no stage is named 'sfx' \(stages before 'prune': sft\)",
        ),
        (
            [{**SFT, "overrides": ["model.name_or_path=${stage:prune.final}"]}, PRUNE],
            [],
            "method.stages.0.overrides.0",
            "refers to stage 'prune', which runs after it",
        ),
        (
            [SFT, {**PRUNE, "overrides": ["model.name_or_path=${stage:prune.dir}"]}],
            [],
            "method.stages.1.overrides.0",
            "in stage 'prune' refers to itself",
        ),
        (
            [SFT, {**PRUNE, "overrides": ["model.name_or_path=${stage:sft.weights}"]}],
            [],
            "method.stages.1.overrides.0",
            "unknown key 'weights'.*dir, final, model",
        ),
        ([SFT, {**PRUNE, "name": "sft"}], [], "method.stages.1.name", "'sft' names two stages"),
        ([SFT, {**PRUNE, "name": "my stage"}], [], "method.stages.1.name", "letters, digits"),
        (
            [SFT, {**PRUNE, "overrides": ["output_dir=/tmp/x"]}],
            [],
            "method.stages.1.overrides.0",
            "cannot set output_dir",
        ),
        ([SFT, {**PRUNE, "recipe": ""}], [], "method.stages.1.recipe", "has no recipe"),
        ([SFT], ["model.name_or_path=builtin:tiny"], "method.common.0", "the pipeline's input model"),
        ([SFT], ["model.name_or_path=${stage:sft.final}"], "method.common.0", "belongs in the overrides"),
        ([SFT, PRUNE], ["+model.name_or_path=x"], "method.common.0", "the pipeline's input model"),
        ([SFT], ["trainer.max_steps"], "method.common.0", "write an override as key=value"),
        ([], [], "method.stages", "is empty"),
    ],
)
def test_a_bad_pipeline_is_one_config_error_naming_the_key_and_stage(tmp_path, stages, common, key, needle):
    with pytest.raises(ConfigError) as err:
        pipeline_cfg(tmp_path, stages, common)
    assert err.value.key == key and "\n" not in str(err.value)
    assert re.search(needle, str(err.value)), str(err.value)


def test_common_may_not_replace_a_referenced_key(tmp_path):
    stages = [SFT, {"name": "dist", "recipe": "distill", "overrides": ["method.teacher=${stage:sft.model}"]}]
    with pytest.raises(ConfigError, match="method.common.0: method.teacher=x: stage 'dist' sets method.teacher"):
        pipeline_cfg(tmp_path, stages, ["method.teacher=x"])


def test_stage_overrides_order_input_model_own_common_output_dir(tmp_path):
    run = pipeline_cfg(tmp_path, [SFT, PRUNE], ["trainer.max_steps=3", "eval.tasks=[]"])
    outputs = {"sft": {"dir": f"{tmp_path}/1-sft", "final": f"{tmp_path}/1-sft/final", "model": "builtin:tiny"}}
    assert stage_overrides(run.method, 0, tmp_path, "builtin:tiny", {}) == [
        "recipe=sft",
        "model.name_or_path=builtin:tiny",
        "trainer.max_steps=2",
        "trainer.max_steps=3",
        "eval.tasks=[]",
        f"output_dir={tmp_path}/1-sft",
    ]
    # A stage that sets its own model does not get the input model; a resumed pipeline adds resume=auto.
    assert stage_overrides(run.method, 1, tmp_path, "builtin:tiny", outputs, resume=True) == [
        "recipe=prune",
        f"model.name_or_path={tmp_path}/1-sft/final",
        "trainer.max_steps=3",
        "eval.tasks=[]",
        f"output_dir={tmp_path}/2-prune",
        "resume=auto",
    ]


def test_plan_composes_every_stage_with_its_references_filled_in(tmp_path):
    stages = [
        SFT,
        {
            "name": "dist",
            "recipe": "distill",
            "overrides": ["model.name_or_path=${stage:sft.dir}", "method.teacher=${stage:sft.model}"],
        },
    ]
    plan = plan_stages(pipeline_cfg(tmp_path, stages, [], "model.name_or_path=builtin:tiny"))
    assert [(p.name, p.runner, p.dir.name) for p in plan] == [("sft", "train", "1-sft"), ("dist", "train", "2-dist")]
    assert plan[0].model == "builtin:tiny" and plan[1].model == str(tmp_path / "1-sft")
    assert "method.teacher=builtin:tiny" in plan[1].overrides  # the model the sft stage started from


@pytest.mark.parametrize(
    "third,needle",
    [
        (
            {"recipe": "sft", "overrides": ["trainer.max_stepz=3"]},
            "method.stages.2: stage 'third' (recipe=sft): Could not override 'trainer.max_stepz'",
        ),
        (
            {"recipe": "sft", "overrides": ["trainer.lr=-1"]},
            "method.stages.2: stage 'third' (recipe=sft): trainer.lr: must be > 0",
        ),
        (
            {"recipe": "prune", "overrides": ["method.criterion=wandaa"]},
            "method.stages.2: stage 'third' (recipe=prune): method.criterion: got 'wandaa'",
        ),
        ({"recipe": "nope"}, "method.stages.2: stage 'third' (recipe=nope): In 'config': Could not find 'recipe/nope'"),
    ],
)
def test_a_bad_later_stage_fails_before_any_stage_runs(tmp_path, monkeypatch, third, needle):
    ran = []
    for name in ("train", "prune"):
        monkeypatch.setitem(RUNNERS, name, lambda cfg: ran.append(cfg.output_dir) or {})
    stages = [SFT, PRUNE, {"name": "third", **third}]
    with pytest.raises(ConfigError) as err:
        run_pipeline(pipeline_cfg(tmp_path / "run", stages))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert ran == [] and not (tmp_path / "run").exists()


def test_a_quantize_stage_that_cannot_run_fails_before_the_stages_before_it(tmp_path):
    stages = [
        SFT,
        {
            "name": "q",
            "recipe": "quantize",
            "overrides": ["model.name_or_path=${stage:sft.final}", "method.scheme=cpu_int8", "trainer.device=cuda"],
        },
    ]
    with pytest.raises(
        ConfigError,
        match=r"method.stages.1: stage 'q' \(recipe=quantize\): trainer.device: "
        "method.scheme=cpu_int8 quantizes for CPU inference",
    ):
        plan_stages(pipeline_cfg(tmp_path, stages))


def test_a_stage_recipe_that_is_a_pipeline_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="method.stages.1.recipe: stage 'inner': recipe=compress is a pipeline"):
        plan_stages(pipeline_cfg(tmp_path, [SFT, {"name": "inner", "recipe": "compress"}]))


def test_resume_other_than_auto_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="resume: got '/x'; a pipeline resumes with resume=auto"):
        run_pipeline(pipeline_cfg(tmp_path, [SFT], [], "resume=/x"))


def test_the_resolver_is_a_fixed_point():
    node = OmegaConf.create({"a": "path: ${stage:rm.dir}}", "b": ["x=${stage:sft,final}"]})
    assert OmegaConf.to_container(node, resolve=True) == {"a": "path: ${stage:rm.dir}}", "b": ["x=${stage:sft.final}"]}


def fake_train(calls):
    """A train runner that only writes a completed summary.json, recording (stage dir name, resume)."""

    def run(cfg):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        calls.append((out.name, cfg.resume))
        summary = {
            "status": "completed",
            "model": cfg.model.name_or_path,
            "steps": 1,
            "wall_time_s": 0.5,
            "eval": {"before": None, "after": {"arithmetic": {"accuracy": 0.25, "n": 4}}},
        }
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    return run


def test_resume_reruns_from_the_first_unfinished_stage_and_everything_after_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(RUNNERS, "train", fake_train(calls))
    stages = [
        SFT,
        {"name": "b", "recipe": "sft", "overrides": ["model.name_or_path=${stage:sft.final}"]},
        {"name": "c", "recipe": "sft", "overrides": ["model.name_or_path=${stage:b.dir}"]},
    ]
    first = run_pipeline(pipeline_cfg(tmp_path, stages))
    assert calls == [("1-sft", None), ("2-b", None), ("3-c", None)] and first["status"] == "completed"
    assert first["stages"][2]["eval"]["after"]["arithmetic"]["accuracy"] == 0.25
    assert first["stages"][2]["model"] == str(tmp_path / "2-b")

    calls.clear()
    (tmp_path / "2-b" / "summary.json").unlink()  # b never finished: c's results were made from an old b
    again = run_pipeline(pipeline_cfg(tmp_path, stages, [], "resume=auto"))
    assert calls == [("2-b", "auto"), ("3-c", None)] and again["skipped"] == ["sft"]
    assert [s["skipped"] for s in again["stages"]] == [True, False, False]
