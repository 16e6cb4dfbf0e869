"""recipe=prm's method: its step loss is the token-classification model's own loss (the one TRL's
PRMTrainer trains with), normalised by the labelled steps; its schema's checks; a PRM is
evaluated by the prm task only, and the prm task needs a PRM."""

from __future__ import annotations

import pytest
import torch

from polmctl.config.schema import DataConfig, ModelConfig
from polmctl.errors import ConfigError
from polmctl.methods.prm import PRMMethod, PRMObjective
from polmctl.models import head_of, load_model, load_tokenizer

pytestmark = pytest.mark.unit

ROWS = [
    {"prompt": "Sam has 12 apples ...", "completions": ["12 + 7 = 19.", "19 - 3 = 16."], "labels": [True, True]},
    {"prompt": "Ava has 5 ...", "completions": ["5 - 2 = 4.", "4 + 1 = 5.", "The answer is 5."], "labels": [False] * 3},
]


@pytest.fixture(scope="module")
def prm_model():
    cfg = ModelConfig(name_or_path="builtin:tiny")
    torch.manual_seed(0)
    return load_model(cfg, head="prm"), load_tokenizer(cfg)


def test_the_step_loss_is_the_token_classification_models_own_loss(prm_model):
    model, tokenizer = prm_model
    assert head_of(model) == "prm" and model.config.num_labels == 2 and model.config.id2label[1] == "correct"
    objective = PRMObjective(PRMMethod())
    examples, stats = objective.encode(ROWS, tokenizer, DataConfig(source="rows"))
    assert stats.steps == 5
    batch = objective.collate(examples)
    assert objective.weight(batch) == 5  # the labelled steps
    model.eval()  # the classifier's dropout off: the two forward passes see the same activations
    terms = objective(model, batch)
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert terms.weight == 5 and (terms.loss_sum / terms.weight).item() == pytest.approx(own.item(), rel=1e-5)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labelled = batch["labels"] != -100
    predicted = logits[labelled].argmax(-1) == batch["labels"][labelled]
    assert terms.metrics["accuracy"].item() == predicted.sum().item()


def test_last_step_only_trains_one_label_per_row(prm_model):
    _, tokenizer = prm_model
    objective = PRMObjective(PRMMethod(train_on_last_step_only=True))
    examples, _ = objective.encode(ROWS, tokenizer, DataConfig(source="rows"))
    assert objective.weight(objective.collate(examples)) == 2


def test_prepare_records_the_separator_and_turns_the_classifier_dropout_off(prm_model):
    model, _ = prm_model
    note = PRMObjective(PRMMethod(step_separator="\n\n")).prepare(
        model, [], device=torch.device("cpu"), model_id="tiny", cache_dir=None
    )
    assert model.config.step_separator == "\n\n" and model.dropout.p == 0.0 and "'\\n\\n'" in note


def test_an_empty_separator_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as info:
        PRMMethod(step_separator="").check("method")
    assert info.value.key == "method.step_separator"


@pytest.mark.parametrize(
    "overrides,key,fix",
    [
        (["recipe=prm", "eval.tasks=[arithmetic]"], r"eval.tasks\[0\]", r"use eval.tasks=\[prm\]"),
        (["recipe=prm", "eval.tasks=[prm,reward]"], r"eval.tasks\[1\]", r"use eval.tasks=\[prm\]"),
        (["recipe=reward_model", "eval.tasks=[prm]"], r"eval.tasks\[0\]", r"use eval.tasks=\[reward\]"),
        (["recipe=dpo", "eval.tasks=[preference,prm]"], r"eval.tasks\[1\]", "use an LM task"),
    ],
)
def test_a_prm_runs_only_the_prm_task_and_the_prm_task_needs_a_prm(overrides, key, fix):
    from polmctl.compose import compose_config
    from polmctl.validate import validate

    with pytest.raises(ConfigError, match=f"{key}.*{fix}"):
        validate(compose_config(overrides))
    assert validate(compose_config(["recipe=prm"])).eval.tasks == ["prm"]
