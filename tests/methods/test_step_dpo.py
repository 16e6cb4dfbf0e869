"""recipe=step_dpo's method: it is DPO with DPO's keys, on pairs whose prefix goes with the prompt,
which for a causal LM gives the same DPO margin as putting the prefix in both answers (the shared
prefix's log-probs cancel), at the cost of the differing steps only."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from polmctl.config.schema import DataConfig, ModelConfig
from polmctl.errors import ConfigError
from polmctl.methods.preference import DPOMethod
from polmctl.methods.step_dpo import StepDPOMethod, StepDPOObjective
from polmctl.models import load_model, load_tokenizer
from polmctl.models.forward import sequence_logps

pytestmark = pytest.mark.unit


def test_the_schema_is_dpos_and_the_step_is_dpos_step():
    assert {f.name for f in fields(DPOMethod)} == {f.name for f in fields(StepDPOMethod)}
    method = StepDPOMethod(loss="ipo", beta=0.4, label_smoothing=0.0, precompute_ref_logps=False)
    objective = StepDPOObjective(method)
    assert objective.needs_reference and objective.method.name == "dpo"
    assert (objective.method.loss, objective.method.beta, objective.method.precompute_ref_logps) == ("ipo", 0.4, False)
    with pytest.raises(ConfigError) as info:
        StepDPOMethod(beta=0).check("method")
    assert info.value.key == "method.beta"


def test_the_prefix_in_the_prompt_gives_the_margin_of_the_prefix_in_both_answers():
    cfg = ModelConfig(name_or_path="builtin:tiny")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, for_training=False)
    row = {"prompt": "Sam has 12 ...", "prefix": "12 + 7 = 19.\n", "chosen": "19 - 3 = 16.", "rejected": "19 - 3 = 15."}
    objective = StepDPOObjective(StepDPOMethod())
    (step,), _ = objective.encode([row], tokenizer, DataConfig(source="pairs"))
    prefix = tokenizer(row["prefix"], add_special_tokens=False)["input_ids"]
    prompt = step["prompt_ids"][: -len(prefix)]
    whole = {
        "prompt_ids": prompt,
        "chosen_ids": prefix + step["chosen_ids"],
        "rejected_ids": prefix + step["rejected_ids"],
    }

    def margin(example):
        logps, lengths = sequence_logps(model, objective.collate([example]))
        return (logps[0] - logps[1]).item(), lengths.tolist()

    step_margin, step_lengths = margin(step)
    whole_margin, whole_lengths = margin(whole)
    assert step_margin == pytest.approx(whole_margin, abs=1e-4)
    assert step_lengths == [len(step["chosen_ids"]), len(step["rejected_ids"])]  # only the steps are scored
    assert whole_lengths == [n + len(prefix) for n in step_lengths]
