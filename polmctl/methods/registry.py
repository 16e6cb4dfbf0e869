"""The one table of methods: name -> schema, training step, runner, and the second model it keeps.

    polmctl run recipe=dpo            # the recipe sets method=dpo; this table says the rest

A recipe names its method (``override /method: dpo``); Hydra types the ``method`` node with the
schema registered here, ``validate`` checks it, and ``entry`` calls the runner this table names
(never a recipe: a recipe cannot restate it). ``polmctl plan`` and ``polmctl export`` read the
same rows. Adding a method: a loss in polmctl/losses/, a module in polmctl/methods/, a row here, a
recipe in polmctl/conf/recipe/, tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore

from polmctl.config.schema import ModelConfig, RunConfig
from polmctl.engine.contract import Objective
from polmctl.errors import ConfigError
from polmctl.methods import (
    distill,
    edit,
    evaluate,
    grpo,
    kto,
    lowrank,
    merge,
    online_dpo,
    pipeline,
    ppo,
    preference,
    prm,
    prune,
    quantize,
    rejection_sampling,
    reward_model,
    sft,
    step_dpo,
    unlearn,
    vlm,
)
from polmctl.methods.reference import holds_frozen_copy

SecondModel = Optional[tuple[str, Optional[ModelConfig]]]  # (what it is, how it loads; None: a copy of the policy)


def _reference(needs: Callable[[Any], bool], precomputed: Callable[[Any], bool] = lambda m: False):
    def second(run: RunConfig) -> SecondModel:
        if holds_frozen_copy(
            needs_reference=needs(run.method), peft_method=run.peft.method, precomputed=precomputed(run.method)
        ):
            return "frozen reference copy", None
        return None

    return second


def _teacher(run: RunConfig) -> SecondModel:
    return f"teacher {run.method.teacher}", distill.teacher_model_config(run.method, run.model)


@dataclass(frozen=True)
class MethodSpec:
    schema: type  # the dataclass of the ``method`` node
    runner: str  # a name of polmctl.runners.RUNNERS: train | prune | quantize | lowrank | merge | vlm | ...
    objective: Callable[[Any], Objective] | None = None  # the training step (runner train)
    second_model: Callable[[RunConfig], SecondModel] = lambda run: None  # what else the run holds in memory


METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec(sft.SFTMethod, "train", sft.SFTObjective),
    "dpo": MethodSpec(
        preference.DPOMethod,
        "train",
        preference.PairwiseObjective,
        _reference(lambda m: True, lambda m: m.precompute_ref_logps),
    ),
    "simpo": MethodSpec(preference.SimPOMethod, "train", preference.PairwiseObjective),
    "cpo": MethodSpec(preference.CPOMethod, "train", preference.PairwiseObjective),
    "orpo": MethodSpec(preference.ORPOMethod, "train", preference.PairwiseObjective),
    "kto": MethodSpec(
        kto.KTOMethod, "train", kto.KTOObjective, _reference(lambda m: True, lambda m: m.precompute_ref_logps)
    ),
    "reward_model": MethodSpec(reward_model.RewardMethod, "train", reward_model.RewardObjective),
    "unlearn": MethodSpec(
        unlearn.UnlearnMethod,
        "train",
        unlearn.UnlearnObjective,
        _reference(lambda m: m.needs_reference, lambda m: not m.live_reference),
    ),
    "prm": MethodSpec(prm.PRMMethod, "train", prm.PRMObjective),
    "step_dpo": MethodSpec(
        step_dpo.StepDPOMethod,
        "train",
        step_dpo.StepDPOObjective,
        _reference(lambda m: True, lambda m: m.precompute_ref_logps),
    ),
    "grpo": MethodSpec(grpo.GRPOMethod, "train", grpo.GRPOObjective, _reference(lambda m: m.beta > 0)),
    "ppo": MethodSpec(ppo.PPOMethod, "train", ppo.PPOObjective, _reference(lambda m: m.kl_coef > 0)),
    "rejection_sampling": MethodSpec(
        rejection_sampling.RejectionSamplingMethod, "train", rejection_sampling.RejectionSamplingObjective
    ),
    "online_dpo": MethodSpec(
        online_dpo.OnlineDPOMethod, "train", online_dpo.OnlineDPOObjective, online_dpo.second_model
    ),
    "distill": MethodSpec(distill.DistillMethod, "train", distill.DistillObjective, _teacher),
    "prune": MethodSpec(prune.PruneMethod, "prune"),
    "quantize": MethodSpec(quantize.QuantizeMethod, "quantize"),
    "lowrank": MethodSpec(lowrank.LowRankMethod, "lowrank"),
    "merge": MethodSpec(merge.MergeMethod, "merge"),
    "edit": MethodSpec(edit.EditMethod, "edit"),
    "vlm": MethodSpec(vlm.VlmMethod, "vlm"),
    "pipeline": MethodSpec(pipeline.PipelineMethod, "pipeline"),
    "evaluate": MethodSpec(evaluate.EvaluateMethod, "evaluate"),
}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError("method.name", f"got {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def build_objective(method: Any) -> Objective:
    """The training step of a validated ``method`` node."""
    spec = method_spec(method.name)
    if spec.objective is None:
        raise ConfigError("method.name", f"{method.name!r} trains nothing: it runs with the {spec.runner} runner")
    return spec.objective(method)


def register_configs() -> None:
    """Register ``RunConfig`` as ``polmctl_schema`` (the first entry of conf/config.yaml) and each
    method's dataclass as an option of the ``method`` group, so a recipe's ``override /method: dpo``
    brings every key of that method, typed, with its default."""
    store = ConfigStore.instance()
    store.store(name="polmctl_schema", node=RunConfig)
    for name, spec in METHODS.items():
        store.store(group="method", name=name, node=spec.schema)
