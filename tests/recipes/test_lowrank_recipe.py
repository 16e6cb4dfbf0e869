"""recipe=lowrank and recipe=lowrank_heal end to end on model=tiny: fewer parameters, a summary of what was
done, final/ that polmctl reloads (dense: that transformers reloads), and a healing stage that trains the
factors and keeps them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from polmctl.compose import compose_config
from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError
from polmctl.models import load_model
from polmctl.models.replaced import LowRankLinear, is_replaced_dir
from polmctl.runners import RUNNERS
from polmctl.runners.lowrank import run_lowrank
from polmctl.runners.pipeline import run_pipeline
from polmctl.validate import runner_of, validate

pytestmark = pytest.mark.recipes

FAST = ["model=tiny", "eval.tasks=[perplexity]", "eval.max_samples=8", "logger.progress=false"]
IDS = torch.tensor([[5, 60, 7, 80, 9, 100, 33]])


def lowrank(tmp_path, *overrides: str) -> dict:
    cfg = validate(
        compose_config(["recipe=lowrank", *FAST, "method.calibration_rows=8", *overrides, f"output_dir={tmp_path}"])
    )
    summary = run_lowrank(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    return summary


def test_lowrank_is_a_registered_runner():
    assert RUNNERS["lowrank"] is run_lowrank
    assert runner_of(validate(compose_config(["recipe=lowrank"]))) == "lowrank"


def test_param_ratio_halves_the_decoder_layers_and_reports_before_and_after(tmp_path):
    summary = lowrank(tmp_path, "method.param_ratio=0.5")
    params = summary["params"]
    # 2 x (q, o 64x64; k, v 32x64; gate, up, down 128x64): 73,728 weights, half of them go (ranks round
    # down, so a little more); the embeddings stay.
    assert params["before"] - params["after"] == pytest.approx(73728 / 2, rel=0.03)
    assert params["factored"] == params["after"] and summary["layers_factored"] == 14
    assert summary["layers"]["model.layers.0.self_attn.q_proj"]["rank"] == 16
    assert summary["eval"]["before"]["perplexity"]["perplexity"] > 0
    assert summary["eval"]["after"]["perplexity"]["perplexity"] > 0
    assert summary["calibration"]["perplexity_after"] != summary["calibration"]["perplexity_before"]
    final = tmp_path / "final"
    assert is_replaced_dir(final)
    reloaded = load_model(ModelConfig(name_or_path=str(final)), for_training=False)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, LowRankLinear)


def test_dense_save_format_is_a_standard_model_dir(tmp_path):
    summary = lowrank(tmp_path, "method.save_format=dense", "method.activation_aware=false")
    assert summary["params"]["after"] == summary["params"]["before"] > summary["params"]["factored"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_lowrank_refuses_adapters_and_a_quantized_model(tmp_path):
    with pytest.raises(ConfigError, match="peft.method: got 'lora'"):
        lowrank(tmp_path, "peft=lora")
    with pytest.raises(ConfigError, match="model.quantization"):
        lowrank(tmp_path, "model.quantization=nf4")


def test_lowrank_heal_trains_the_factors_and_final_stays_factored(tmp_path):
    cfg = validate(
        compose_config(
            [
                "recipe=lowrank_heal",
                "model=tiny",
                f"output_dir={tmp_path}",
                "method.common=['trainer.max_steps=3','eval.tasks=[]','logger.progress=false','data.max_rows=16']",
            ]
        )
    )
    run_pipeline(cfg)
    compressed = load_model(ModelConfig(name_or_path=str(tmp_path / "1-lowrank" / "final")), for_training=False)
    healed = load_model(ModelConfig(name_or_path=str(tmp_path / "final")), for_training=False)
    assert isinstance(healed.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert sum(p.numel() for p in healed.parameters()) == sum(p.numel() for p in compressed.parameters())
    with torch.no_grad():
        assert not torch.allclose(healed(input_ids=IDS).logits, compressed(input_ids=IDS).logits, atol=1e-4)
