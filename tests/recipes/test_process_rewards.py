"""Process rewards end to end on model=tiny: recipe=prm learns its step labels and its final/ loads
with from_pretrained and scores like training; recipe=step_dpo separates its step pairs; a PRM run
dir is the reward of rejection sampling (best-of-n) and GRPO."""

from __future__ import annotations

import pytest

from polmctl.engine.metrics import read_metrics

pytestmark = pytest.mark.recipes

REPEATED_BATCH = [
    "data.max_rows=4",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=1",
    "trainer.max_steps=12",
    "peft.dropout=0",
    "trainer.max_grad_norm=0",
    "trainer.scheduler=constant",
]
# Evaluate on the training rows themselves (the first 4 of the train split), before and after.
ON_TRAINING_ROWS = ["data.eval_split=train", "eval.max_samples=4", "eval.before=true"]


def test_prm_learns_the_step_labels_of_its_training_rows(train_recipe):
    run = train_recipe(
        "prm", *REPEATED_BATCH, "trainer.max_steps=20", "trainer.lr=1e-2", "eval.tasks=[prm]", *ON_TRAINING_ROWS
    )
    assert run.unchanged_parameters() == []
    assert any("score" in name for name in run.initial)  # the fresh head trains along with LoRA
    lines = read_metrics(run.dir / "metrics.jsonl")
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.3, [l["loss"] for l in lines]
    assert lines[-1]["accuracy"] == 1.0
    before, after = run.summary["eval"]["before"]["prm"], run.summary["eval"]["after"]["prm"]
    assert after["n"] == 4 and after["steps"] == 12
    assert after["step_accuracy"] == 1.0 and after["first_error_accuracy"] == 1.0
    assert before["step_accuracy"] < 1.0


def test_prm_final_dir_is_a_token_classifier_that_scores_like_training(train_recipe):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from polmctl.data import load_rows
    from polmctl.evals.steps import prm_accuracy

    run = train_recipe("prm", *REPEATED_BATCH[:3], "trainer.max_steps=3", "method.step_separator=' ;'")
    final = run.dir / "final"
    assert not (final / "adapter_config.json").exists()  # merged: no peft needed to load it
    loaded = AutoModelForTokenClassification.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert loaded.config.num_labels == 2 and loaded.config.id2label == {0: "wrong", 1: "correct"}
    assert loaded.config.step_separator == " ;"  # what polmctl eval and the prm reward split steps at
    rows = load_rows("builtin:arithmetic_steps", "test", max_rows=6)
    ours = prm_accuracy(run.model, tokenizer, rows, batch_size=4)["samples"]
    theirs = prm_accuracy(loaded, tokenizer, rows, batch_size=3)["samples"]
    for a, b in zip(ours, theirs):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_polmctl_eval_of_a_prm_run_runs_the_prm_task_only(train_recipe):
    from polmctl.compose import compose_config
    from polmctl.errors import ConfigError
    from polmctl.runners.evaluate import run_evaluate
    from polmctl.validate import validate

    run = train_recipe("prm", *REPEATED_BATCH[:3], "trainer.max_steps=2", "eval.tasks=[prm]", "eval.max_samples=6")
    common = ["method=evaluate", f"model.name_or_path={run.dir}", "eval.max_samples=6", "logger.progress=false"]
    summary = run_evaluate(validate(compose_config([*common, "eval.tasks=[prm]", f"output_dir={run.dir}/e1"])))
    assert summary["eval"]["prm"] == pytest.approx(run.summary["eval"]["after"]["prm"])  # same model, same rows
    with pytest.raises(
        ConfigError, match=r"'arithmetic' cannot evaluate a process reward model; use eval.tasks=\[prm\]"
    ):
        run_evaluate(validate(compose_config([*common, "eval.tasks=[arithmetic]", f"output_dir={run.dir}/e2"])))


def test_step_dpo_separates_its_step_pairs(train_recipe):
    run = train_recipe(
        "step_dpo",
        *REPEATED_BATCH,
        "trainer.lr=1e-2",
        "eval.tasks=[step_preference]",
        *ON_TRAINING_ROWS,
    )
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    assert lines[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at step 1
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.05, [l["loss"] for l in lines]
    assert lines[0]["rewards/accuracies"] == 0.0 and lines[-1]["rewards/accuracies"] == 1.0
    after = run.summary["eval"]["after"]["step_preference"]
    assert after["n"] == 4 and after["accuracy"] == 1.0
    assert after["mean_margin"] > run.summary["eval"]["before"]["step_preference"]["mean_margin"]


SAMPLING = [
    "method.num_samples=4",
    "method.prompts_per_round=4",
    "method.steps_per_round=2",
    "method.max_new_tokens=16",
    "method.top_k=50",
    "trainer.micro_batch_size=4",
    "trainer.lr=3e-3",
]


def test_rejection_sampling_keeps_the_answers_a_prm_accepts(train_recipe, tmp_path):
    from polmctl.errors import TrainingError

    prm = str(train_recipe("prm", *REPEATED_BATCH[:3], "trainer.max_steps=2", run_dir=tmp_path / "prm").dir)
    rewards = {
        how: f"method.rewards=[{{name: prm, path: {prm}, kwargs: {{aggregate: {how}}}}}]" for how in ("min", "product")
    }
    rounds = {}
    for how, reward in rewards.items():
        run = train_recipe(
            "rejection_sampling",
            reward,
            "method.threshold=0.0",
            "trainer.max_steps=4",
            *SAMPLING,
            run_dir=tmp_path / how,
        )
        assert run.unchanged_parameters() == []
        rounds[how] = [l for l in read_metrics(run.dir / "metrics.jsonl") if "round" in l]
        assert [l["step"] for l in rounds[how]] == [1, 3]
        assert all(l["acceptance_rate"] == 1.0 and 0.0 < l["reward"] < 1.0 for l in rounds[how])
    # The same seed samples the same first round; a product of step scores is never above their minimum.
    assert rounds["product"][0]["reward"] <= rounds["min"][0]["reward"] + 1e-6
    # A PRM's score is a probability below 1: it decides what a threshold of 1 accepts (nothing).
    with pytest.raises(TrainingError, match="accepted no answer"):
        train_recipe("rejection_sampling", rewards["min"], "method.threshold=1.0", "trainer.max_steps=2", *SAMPLING)


def test_grpo_with_a_prm_reward(train_recipe, tmp_path):
    prm = str(train_recipe("prm", *REPEATED_BATCH[:3], "trainer.max_steps=2", run_dir=tmp_path / "prm").dir)
    run = train_recipe(
        "grpo",
        f"method.rewards=[math_answer, {{name: prm, path: {prm}, weight: 0.5}}]",
        "method.num_generations=4",
        "method.max_new_tokens=16",
        "method.top_k=50",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=8",
        "trainer.grad_accum=1",
        run_dir=tmp_path / "grpo",
    )
    assert run.unchanged_parameters() == []
    for line in read_metrics(run.dir / "metrics.jsonl"):
        assert 0.0 < line["rewards/prm"] < 1.0 and line["reward"] == pytest.approx(
            line["rewards/math_answer"] + 0.5 * line["rewards/prm"], abs=1e-5
        )
