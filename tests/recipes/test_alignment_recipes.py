"""Each offline preference recipe end to end on model=tiny: weights change, the loss falls on
a repeated batch, the implicit-reward accuracy on the training pairs rises."""

from __future__ import annotations

import pytest

from polmctl.engine.metrics import read_metrics

pytestmark = pytest.mark.recipes

# At 3e-2 IPO's and SimPO's LoRA steps overshoot and oscillate on this batch (their first steps are the
# largest: IPO's squared loss pulls with 2 (h - 1/(2 beta)) = -10), so the last step's figures hung on
# float rounding; at 1e-2 both climb steadily.
RECIPES = {
    "dpo": "trainer.lr=3e-2",
    "ipo": "trainer.lr=1e-2",
    "simpo": "trainer.lr=1e-2",
    "orpo": "trainer.lr=3e-2",
    "cpo": "trainer.lr=3e-2",
}
PAIRED = list(RECIPES)
REPEATED_BATCH = [
    "data.max_rows=4",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=1",
    "trainer.max_steps=12",
    "peft.dropout=0",
    "trainer.max_grad_norm=0",
    "trainer.scheduler=constant",
]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_preference_recipe_trains_and_separates_the_pairs(train_recipe, recipe):
    run = train_recipe(recipe, RECIPES[recipe], *REPEATED_BATCH)
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    losses = [l["loss"] for l in lines]
    assert losses[-1] < losses[0] - 0.05, losses
    margins = [l["logps/chosen"] - l["logps/rejected"] for l in lines]
    assert margins[-1] > margins[0], margins
    if recipe in ("dpo", "ipo"):
        assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
        assert lines[0]["rewards/accuracies"] == 0.0 and lines[-1]["rewards/accuracies"] >= 0.75


def test_dpo_starts_at_ln2_when_policy_equals_reference(train_recipe, tmp_path):
    """recipe=dpo adds the chosen answer's NLL (RPO, method.sft_weight=1): the loss less that term is
    DPO's ln 2; with method.sft_weight=0 the loss is ln 2 alone."""
    run = train_recipe("dpo", *REPEATED_BATCH[:3], "trainer.max_steps=1", run_dir=tmp_path / "rpo")
    first = read_metrics(run.dir / "metrics.jsonl")[0]
    assert first["nll"] > 1 and first["loss"] - first["nll"] == pytest.approx(0.693147, abs=1e-5)
    run = train_recipe(
        "dpo", *REPEATED_BATCH[:3], "trainer.max_steps=1", "method.sft_weight=0", run_dir=tmp_path / "dpo"
    )
    first = read_metrics(run.dir / "metrics.jsonl")[0]
    assert "nll" not in first and first["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_reference_paths_agree(train_recipe, tmp_path):
    """Cached reference log-probs and the adapter-disabled reference give the same curve."""
    args = ["trainer.max_steps=3", "data.max_rows=8", "trainer.micro_batch_size=4", "peft.dropout=0"]
    curves = []
    for precompute in ("true", "false"):
        run = train_recipe("dpo", *args, f"method.precompute_ref_logps={precompute}", run_dir=tmp_path / precompute)
        curves.append([l["loss"] for l in read_metrics(run.dir / "metrics.jsonl")])
    assert len(curves[0]) == 3 and curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_full_finetuning_dpo_keeps_a_frozen_reference(train_recipe):
    run = train_recipe(
        "dpo",
        "peft=none",
        "method.precompute_ref_logps=false",
        "trainer.lr=1e-3",
        "method.sft_weight=0",
        *REPEATED_BATCH[:3],
        "trainer.max_steps=4",
    )
    lines = read_metrics(run.dir / "metrics.jsonl")
    assert lines[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and lines[-1]["loss"] < lines[0]["loss"]


def test_reference_logps_are_cached_and_reused(train_recipe, tmp_path, capsys):
    args = [
        "trainer.max_steps=1",
        "data.max_rows=8",
        "trainer.micro_batch_size=4",
        "trainer.grad_accum=1",
        f"model.cache_dir={tmp_path / 'cache'}",
    ]
    train_recipe("dpo", *args, run_dir=tmp_path / "a")
    assert "computed once for 4 pairs" in capsys.readouterr().err  # one step of 4: only the rows it visits
    train_recipe("dpo", *args, run_dir=tmp_path / "b")
    assert "reused" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 1


def test_sft_rows_in_a_preference_recipe_fail_early(train_recipe):
    from polmctl.errors import DataError

    with pytest.raises(DataError, match="needs .prompt, chosen, rejected."):
        train_recipe("dpo", "data=arithmetic")


def test_kto_trains_desirable_up_and_undesirable_down(train_recipe):
    run = train_recipe(
        "kto",
        "trainer.lr=3e-3",
        "method.beta=1.0",
        *REPEATED_BATCH[1:],
        "data.max_rows=8",
        "trainer.micro_batch_size=8",
    )
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    assert lines[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # policy == reference: 1 - sigmoid(0) for every row
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.05
    assert lines[-1]["rewards/chosen"] > 0 > lines[-1]["rewards/rejected"]


def test_kto_rejects_paired_rows(train_recipe):
    from polmctl.errors import DataError

    with pytest.raises(DataError, match="kto needs unpaired rows"):
        train_recipe("kto", "data=arithmetic_preference")


def test_unpaired_rows_in_a_pairwise_recipe_fail_early(train_recipe):
    from polmctl.errors import DataError

    with pytest.raises(DataError, match=r"dpo needs paired rows .*those train with recipe=kto"):
        train_recipe("dpo", "data=arithmetic_feedback")
