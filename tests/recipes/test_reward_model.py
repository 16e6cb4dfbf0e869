"""recipe=reward_model end to end on model=tiny: the score head and adapters train, the
Bradley-Terry loss falls and pairwise accuracy rises on a repeated batch, final/ loads as
AutoModelForSequenceClassification and scores as in training, `polmctl eval` reports
held-out accuracy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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
    "trainer.lr=1e-2",
]


def test_reward_model_learns_the_training_pairs(train_recipe):
    run = train_recipe("reward_model", *REPEATED_BATCH)
    assert run.unchanged_parameters() == []
    assert any("score" in name for name in run.initial)  # the fresh head trains along with LoRA
    lines = read_metrics(run.dir / "metrics.jsonl")
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.2
    assert lines[-1]["accuracy"] == 1.0 and lines[-1]["margin"] > lines[0]["margin"]
    for line in lines:  # the logged margin is the mean score gap
        assert line["margin"] == pytest.approx(line["rewards/chosen"] - line["rewards/rejected"], abs=1e-4)


def test_final_dir_is_a_sequence_classifier_that_scores_like_training(train_recipe):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from polmctl.data import load_rows
    from polmctl.evals.reward import reward_accuracy

    run = train_recipe("reward_model", *REPEATED_BATCH[:-2], "trainer.max_steps=3")
    final = run.dir / "final"
    assert not (final / "adapter_config.json").exists()  # merged: no peft needed to load it
    loaded = AutoModelForSequenceClassification.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tokenizer.pad_token_id
    rows = load_rows("builtin:style_preference", "test", max_rows=6)
    ours = reward_accuracy(run.model, tokenizer, rows, batch_size=3)["samples"]
    theirs = reward_accuracy(loaded, tokenizer, rows, batch_size=3)["samples"]
    for a, b in zip(ours, theirs):
        assert a["chosen_score"] == pytest.approx(b["chosen_score"], abs=1e-4)
        assert a["rejected_score"] == pytest.approx(b["rejected_score"], abs=1e-4)


def test_an_unmerged_reward_adapter_loads_back_as_a_reward_model(train_recipe):
    from polmctl.config.schema import ModelConfig
    from polmctl.data import load_rows
    from polmctl.evals.reward import reward_accuracy
    from polmctl.models import is_reward_model, load_model, load_tokenizer

    run = train_recipe("reward_model", *REPEATED_BATCH[:-2], "trainer.max_steps=2", "peft.merge_on_save=false")
    assert (run.dir / "final" / "adapter_config.json").exists()
    cfg = ModelConfig(name_or_path=str(run.dir))
    tokenizer = load_tokenizer(cfg)
    loaded = load_model(cfg, for_training=False, pad_token_id=tokenizer.pad_token_id)
    assert is_reward_model(loaded)
    rows = load_rows("builtin:style_preference", "test", max_rows=4)
    ours = reward_accuracy(run.model, tokenizer, rows, batch_size=4)["samples"]
    theirs = reward_accuracy(loaded, tokenizer, rows, batch_size=4)["samples"]
    assert [s["chosen_score"] for s in ours] == pytest.approx([s["chosen_score"] for s in theirs], abs=1e-4)


def test_margin_column_raises_the_loss_by_the_required_gap():
    from polmctl.methods.reward_model import RewardMethod, RewardObjective

    class Scores(torch.nn.Module):  # a stand-in model whose score is the row's first token id
        def forward(self, input_ids, attention_mask, use_cache):
            return type("Out", (), {"logits": input_ids[:, :1].float()})

    objective = RewardObjective(RewardMethod(), pad_token_id=0)
    examples = [{"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [2], "margin": 2.0}]
    batch = {k: v for k, v in objective.collate(examples).items()}
    batch["input_ids"] = torch.tensor([[3, 1], [2, 1]])
    terms = objective(Scores(), batch)
    # -log sigmoid(3 - 2 - 2) = log(1 + e)
    assert terms.loss_sum.item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(1.0))).item())
    assert terms.metrics["accuracy"].item() == 1.0 and terms.weight == 1


def test_rows_with_and_without_margin_are_refused(train_recipe, tmp_path):
    from polmctl.errors import DataError

    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.0},
        {"prompt": "r", "chosen": "c", "rejected": "d"},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="1 kept rows have no margin"):
        train_recipe("reward_model", f"data.source={path}")


def test_lm_eval_tasks_are_refused_for_a_reward_model():
    from polmctl.compose import compose_config
    from polmctl.errors import ConfigError
    from polmctl.validate import validate

    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].*use eval.tasks=\[reward\]"):
        validate(compose_config(["recipe=reward_model", "eval.tasks=[arithmetic]"]))
    with pytest.raises(ConfigError, match=r"eval.tasks\[1\]"):
        validate(compose_config(["recipe=dpo", "eval.tasks=[preference,reward]"]))


def test_polmctl_eval_of_a_reward_run_reports_held_out_accuracy(train_recipe, tmp_path):
    run_dir = tmp_path / "rm"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "polmctl",
            "run",
            "recipe=reward_model",
            "model=tiny",
            "debug=quick",
            "eval.before=false",
            "eval.max_samples=8",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = subprocess.run(
        [sys.executable, "-m", "polmctl", "eval", str(run_dir), "eval.max_samples=8"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (summary,) = list((tmp_path / "outputs" / "eval").glob("*/*/summary.json"))
    metrics = json.loads(summary.read_text())["eval"]["reward"]
    assert metrics["n"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    trained = json.loads((run_dir / "summary.json").read_text())["eval"]["after"]["reward"]
    assert metrics["accuracy"] == pytest.approx(trained["accuracy"])  # same model, same held-out pairs
