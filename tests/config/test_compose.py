"""Every YAML in polmctl/conf composes and validates; bad configs fail with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from polmctl.cli import recipe_infos
from polmctl.config.compose import compose_config, compose_validated
from polmctl.config.schema import PARADIGMS, ConfigError, RunConfig
from polmctl.config.validate import validate

pytestmark = pytest.mark.config

CONF = Path(__file__).resolve().parents[2] / "polmctl" / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))


def group_options():
    for group in ("model", "data", "peft", "trainer", "logger", "eval", "debug"):
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    run, text = compose_validated([f"recipe={recipe}"])
    assert isinstance(run, RunConfig)
    assert run.recipe.name == recipe, "recipe.name must match the file name"
    assert run.recipe.paradigm in PARADIGMS and run.recipe.summary
    assert f"name: {recipe}" in text


# Options that only make sense beside another choice: a reward-model eval needs a reward
# model; a non-training method needs its own runner; virtual-token adapters do not pack (the default
# recipe, lora, packs its SFT micro-batches).
COMPANIONS = {("eval", "reward"): ["recipe=reward_model"], ("method", "reward_model"): ["eval=reward"],
              ("method", "prune"): ["runner=prune"], ("method", "quantize"): ["runner=quantize"],
              ("method", "pipeline"): ["runner=pipeline"], ("peft", "prompt_tuning"): ["data.packing=false"],
              ("peft", "prefix_tuning"): ["data.packing=false"]}


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_group_option_composes_and_validates(group, option):
    run, _ = compose_validated([f"{group}={option}", *COMPANIONS.get((group, option), [])])
    assert isinstance(run, RunConfig)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_files_open_with_their_command(recipe):
    lines = (CONF / "recipe" / f"{recipe}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1] == f"# polmctl run recipe={recipe}"
    assert lines[2].startswith("# Paradigm: ")


def test_recipes_listing_reads_every_file():
    assert sorted(r["name"] for r in recipe_infos()) == RECIPES


def test_overrides_reach_the_typed_config():
    run, _ = compose_validated(["recipe=lora", "trainer.lr=1e-4", "peft.r=4", "model=tiny"])
    assert run.trainer.lr == pytest.approx(1e-4) and run.peft.r == 4
    assert run.model.name_or_path == "builtin:tiny" and run.peft.method == "lora"


def test_recipe_selects_its_group_options():
    assert compose_validated(["recipe=qlora"])[0].model.quantization == "nf4"
    assert compose_validated(["recipe=sft"])[0].peft.method == "none"
    assert compose_validated(["recipe=continued_pretraining"])[0].data.source == "builtin:domain_text"


@pytest.mark.parametrize("override,key,hint", [
    ("trainer.lr=-1", "trainer.lr", "> 0"),
    ("peft.r=0", "peft.r", "> 0"),
    ("+trainer.foo=1", "trainer.foo", "max_steps"),
    ("+foo=1", "foo", "trainer"),
    ("data.overlong=maybe", "data.overlong", "truncate, drop, error"),
    ("model.dtype=fp8", "model.dtype", "bfloat16"),
    ("trainer.scheduler=step", "trainer.scheduler", "cosine"),
    ("+method.beta=0.1", "method.beta", "objective"),
    ("method.objective=nope", "method.objective", "sft"),
    ("eval.tasks=[mmlu]", "eval.tasks[0]", "arithmetic"),
    ("peft.dropout=1.5", "peft.dropout", "[0, 1)"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, key, hint):
    with pytest.raises(ConfigError) as info:
        validate(compose_config([override]))
    assert info.value.key == key
    assert hint in str(info.value)
    assert str(info.value).startswith(f"{key}: ")


@pytest.mark.parametrize("override,needle", [
    ("recipe=nope", "Available options in 'recipe'"),
    ("trainer.lr=abc", "trainer.lr"),
    ("trainer.nope=1", "trainer.nope"),
])
def test_composition_errors_are_one_line_with_the_key(override, needle):
    with pytest.raises(ValueError) as info:
        compose_config([override])
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides,match", [
    (["recipe=sft", "method=prune"], r"method.objective: 'prune' trains nothing: it runs with runner=prune"),
    (["recipe=sft", "runner=prune"], r"method.objective: runner=prune reads method=prune, got .sft."),
])
def test_the_method_must_fit_the_runner(overrides, match):
    from polmctl.config.schema import ConfigError
    from polmctl.config.validate import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose_config(overrides))
