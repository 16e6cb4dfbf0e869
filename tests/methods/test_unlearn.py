"""The unlearn method on the tiny model: how forget and retain rows pair into examples and batches,
the loss of one batch against the losses computed row by row, and the reference paths agreeing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import DataConfig, ModelConfig
from polmctl.data import load_rows
from polmctl.errors import ConfigError, DataError
from polmctl.losses import unlearn as losses
from polmctl.methods.unlearn import UnlearnMethod, UnlearnObjective
from polmctl.models import load_model, load_tokenizer
from polmctl.models.forward import labelled_logits, sequence_logps

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
DATA = DataConfig(source="builtin:facts")


def rows(forget: int, retain: int) -> list[dict]:
    everything = load_rows("builtin:facts", "train")
    return [r for r in everything if r["role"] == "forget"][:forget] + [r for r in everything if r["role"] == "retain"][
        :retain
    ]


def encoded(method: UnlearnMethod, forget: int = 3, retain: int = 5):
    objective = UnlearnObjective(method)
    examples, stats = objective.encode(rows(forget, retain), load_tokenizer(TINY), DATA)
    return objective, examples, stats


def test_an_epoch_visits_the_larger_set_once_and_cycles_the_smaller():
    objective, examples, stats = encoded(UnlearnMethod(), forget=3, retain=5)
    assert len(examples) == 5 and "5 examples an epoch" in stats.summary()
    assert [e["completion_ids"] for e in examples[3:]] == [e["completion_ids"] for e in examples[:2]]  # cycles
    assert len({tuple(e["retain_completion_ids"]) for e in examples}) == 5  # every retain row once
    batch = objective.collate(examples[:2])
    assert batch["input_ids"].size(0) == 4 and objective.weight(batch) == 2  # forget rows, then retain rows
    first = examples[0]
    for row, prompt, answer in ((0, "prompt_ids", "completion_ids"), (2, "retain_prompt_ids", "retain_completion_ids")):
        n, m = len(first[prompt]), len(first[answer])
        assert batch["input_ids"][row, : n + m].tolist() == first[prompt] + first[answer]
        assert batch["labels"][row, : n + m].tolist() == [-100] * n + first[answer]  # labels on the answer only


def test_without_a_retain_term_only_the_forget_rows_are_examples():
    objective, examples, _ = encoded(UnlearnMethod(retain="none"), forget=3, retain=5)
    assert len(examples) == 3 and "retain_prompt_ids" not in examples[0]
    assert objective.collate(examples)["input_ids"].size(0) == 3


@pytest.mark.parametrize(
    "data_rows, method, match",
    [
        ([{"prompt": "q", "completion": "a"}], UnlearnMethod(), "row 0 has no 'role' column"),
        ([{"prompt": "q", "completion": "a", "role": "keep"}], UnlearnMethod(), "row 0 has role 'keep'"),
        ([{"prompt": "q", "completion": "a", "role": "retain"}], UnlearnMethod(), "no row has role 'forget'"),
        ([{"prompt": "q", "completion": "a", "role": "forget"}], UnlearnMethod(retain="kl"), "method.retain=none"),
        (
            [{"messages": [{"role": r, "content": "x"} for r in ("user", "assistant")] * 2, "role": "forget"}],
            UnlearnMethod(retain="none"),
            "more than one place",
        ),
    ],
)
def test_rows_without_roles_are_refused_naming_the_row(data_rows, method, match):
    with pytest.raises(DataError, match=match):
        UnlearnObjective(method).encode(data_rows, load_tokenizer(TINY), DATA)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"loss": "dpo"}, "loss"), ({"retain": "ce"}, "retain"), ({"beta": 0}, "beta"), ({"gamma": -1}, "gamma")],
)
def test_bad_method_keys_are_named(kwargs, key):
    with pytest.raises(ConfigError) as info:
        UnlearnMethod(**kwargs).check("method")
    assert info.value.key == f"method.{key}"


def test_the_kl_retain_term_is_each_retain_answers_mean_kl_to_the_reference():
    """Batch loss against the row-by-row formula: the policy is perturbed away from a frozen start."""
    method = UnlearnMethod(loss="gradient_ascent", retain="kl", forget_weight=0.5, retain_weight=2.0)
    objective, examples, _ = encoded(method, forget=3, retain=3)
    model = load_model(TINY)
    objective.prepare(model, examples, device=torch.device("cpu"), model_id="tiny", cache_dir=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    batch = objective.collate(examples)
    terms = objective(model, batch)
    expected = []
    for e in examples:
        one = objective.collate([e])
        forget_part = {k: one[k][:1] for k in ("input_ids", "attention_mask", "labels")}
        logp, n = sequence_logps(model, forget_part)
        retain_inputs = {k: one[k][1:] for k in ("input_ids", "attention_mask")}
        policy = labelled_logits(model, retain_inputs, one["labels"][1:]).logits
        ref = labelled_logits(objective.reference.frozen, retain_inputs, one["labels"][1:]).logits
        kl = losses.retain_kl(policy, ref).mean()
        expected.append(0.5 * losses.gradient_ascent_loss(logp / n) + 2.0 * kl)
    assert terms.weight == 3
    torch.testing.assert_close(terms.loss_sum, torch.stack(expected).sum(), rtol=1e-4, atol=1e-5)


def test_precomputed_and_live_reference_give_the_same_npo_loss(tmp_path):
    losses_by_path = []
    for precompute in (True, False):
        objective, examples, _ = encoded(UnlearnMethod(precompute_ref_logps=precompute), forget=4, retain=4)
        torch.manual_seed(0)
        model = load_model(TINY)
        note = objective.prepare(model, examples, device=torch.device("cpu"), model_id="tiny", cache_dir=tmp_path)
        assert ("cached in" in note) == precompute
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.eval()
        batch = objective.collate(examples)
        assert ("ref_logps" in batch) == precompute
        losses_by_path.append(objective(model, batch).loss_sum)
    torch.testing.assert_close(losses_by_path[0], losses_by_path[1], rtol=1e-5, atol=1e-5)


def test_the_registry_holds_a_frozen_copy_only_when_the_reference_runs_during_training():
    from polmctl.methods.registry import METHODS

    second = METHODS["unlearn"].second_model
    run = lambda **kw: SimpleNamespace(method=UnlearnMethod(**kw), peft=SimpleNamespace(method="none"))  # noqa: E731
    assert second(run()) is None  # npo with cached reference log-probs
    assert second(run(retain="kl")) is not None
    assert second(run(precompute_ref_logps=False)) is not None
    assert second(run(loss="simnpo")) is None
