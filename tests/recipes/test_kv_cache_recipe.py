"""generation.cache=quantized where a run generates: evaluation, a GRPO run's rollouts, and polmctl chat
(--cache); the setting is the run's only, never saved with the model."""

from __future__ import annotations

import json

import pytest
from transformers import GenerationMixin
from typer.testing import CliRunner

import polmctl.cli as cli
from polmctl.compose import compose_config
from polmctl.config.schema import ModelConfig
from polmctl.evals import evaluate_run
from polmctl.models import load_model, load_tokenizer
from polmctl.validate import validate

pytestmark = pytest.mark.recipes

CACHE = ["generation.cache=quantized", "generation.cache_group_size=16", "generation.cache_residual_length=8"]


@pytest.fixture()
def generate_calls(monkeypatch):
    """The KV cache every ``generate`` call of the test ran with (None: transformers' dynamic cache)."""
    calls = []
    real = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(self.generation_config.cache_implementation)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return calls


def test_evaluation_generates_with_the_quantized_cache(tmp_path, generate_calls):
    cfg = validate(compose_config(["model=tiny", "eval.max_samples=4", "eval.max_new_tokens=12", *CACHE]))
    model = load_model(ModelConfig(name_or_path="builtin:tiny"), for_training=False)
    results = evaluate_run(cfg, model, load_tokenizer(cfg.model), tmp_path, "after")
    assert results["arithmetic"]["n"] == 4
    assert generate_calls and set(generate_calls) == {"quantized"}
    assert model.generation_config.cache_implementation is None


def test_polmctl_eval_generates_with_the_quantized_cache(tmp_path, generate_calls):
    from polmctl.runners.evaluate import run_evaluate

    overrides = ["method=evaluate", "model=tiny", "eval.max_samples=4", "eval.max_new_tokens=12", *CACHE]
    summary = run_evaluate(validate(compose_config([*overrides, f"output_dir={tmp_path}"])))
    assert summary["eval"]["arithmetic"]["n"] == 4
    assert generate_calls and set(generate_calls) == {"quantized"}


def test_grpo_rollouts_sample_with_the_quantized_cache_and_final_does_not_keep_it(train_recipe, generate_calls):
    run = train_recipe(
        "grpo",
        *CACHE,
        "method.num_generations=2",
        "method.max_new_tokens=12",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=4",
        "trainer.grad_accum=1",
    )
    assert len(run.losses) == 2
    assert generate_calls and set(generate_calls) == {"quantized"}
    saved = json.loads((run.dir / "final" / "adapter_config.json").read_text())  # grpo trains LoRA
    base = load_model(ModelConfig(name_or_path=str(run.dir)), for_training=False)
    assert saved and base.generation_config.cache_implementation is None


def test_chat_takes_the_cache_options(generate_calls):
    args = ["chat", "builtin:tiny", "--prompt", "2+3?", "--temperature", "0", "--max-new-tokens", "20"]
    result = CliRunner().invoke(cli.app, [*args, "--cache", "quantized", "--cache-group-size", "16"])
    assert result.exit_code == 0, result.output
    assert generate_calls == ["quantized"]
    bad = CliRunner().invoke(cli.app, [*args, "--cache", "quantized", "--cache-nbits", "5"])
    assert bad.exit_code != 0 and "--cache-nbits: got 5; allowed: 1, 2, 3, 4, 8" in bad.output
    wide = CliRunner().invoke(cli.app, [*args, "--cache", "quantized"])  # groups of 64, head dim 16
    assert wide.exit_code != 0 and "--cache-group-size: 64 does not divide the model's head dim 16" in wide.output
