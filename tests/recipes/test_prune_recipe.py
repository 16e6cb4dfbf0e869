"""recipe=prune end to end on model=tiny: the sparsity asked for, final/ reloads with its zeros,
depth pruning drops layers and still loads and generates; bad runs fail with the key."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from polmctl.compose import compose_config
from polmctl.errors import ConfigError
from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer
from polmctl.runners import RUNNERS
from polmctl.runners.prune import run_prune
from polmctl.validate import runner_of, validate

pytestmark = pytest.mark.recipes

FAST = ["model=tiny", "eval=none", "logger.progress=false", "method.calibration_rows=8"]


def prune(tmp_path, *overrides: str) -> dict:
    cfg = validate(compose_config(["recipe=prune", *FAST, *overrides, f"output_dir={tmp_path}"]))
    summary = run_prune(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    return summary


def test_prune_is_a_registered_runner():
    assert RUNNERS["prune"] is run_prune
    assert runner_of(validate(compose_config(["recipe=prune"]))) == "prune"


def test_magnitude_50_percent_is_reached_and_survives_reloading(tmp_path):
    summary = prune(tmp_path, "method.criterion=magnitude", "method.sparsity=0.5")
    sparsity = summary["sparsity"]
    assert sparsity["requested"] == 0.5 and sparsity["overall"] == pytest.approx(0.5)
    assert len(sparsity["per_tensor"]) == 14 and all(v == pytest.approx(0.5) for v in sparsity["per_tensor"].values())
    assert summary["params"]["before"] == summary["params"]["after"]
    assert summary["layers"]["dropped"] == []
    assert summary["calibration"]["rows"] == 8 and summary["calibration"]["perplexity_after"] > 0

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    weights = reloaded.state_dict()
    original = build_tiny_model(build_tiny_tokenizer()).state_dict()
    for name, fraction in sparsity["per_tensor"].items():
        w, before = weights[name], original[name]
        assert (w == 0).float().mean().item() == pytest.approx(fraction), name
        kept = w != 0
        assert torch.equal(w[kept], before[kept]), "kept weights are untouched"
        assert before.abs()[~kept].max() <= before.abs()[kept].min(), "the smallest |W| went"
    assert torch.equal(weights["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_nm_run_writes_the_2_4_pattern(tmp_path):
    summary = prune(tmp_path, "method.criterion=nm")
    assert summary["sparsity"]["pattern"] == "2:4" and summary["sparsity"]["overall"] == pytest.approx(0.5)
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "final").model.layers[1].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()


def test_depth_prune_drops_layers_and_reloads(tmp_path):
    summary = prune(tmp_path, "method.criterion=depth", "method.num_layers_to_drop=1")
    layers = summary["layers"]
    assert layers["before"] == 2 and layers["after"] == 1 and len(layers["dropped"]) == 1
    dropped = layers["dropped"][0]
    assert dropped["importance"] == min(layers["importance"]) == layers["importance"][dropped["index"]]
    assert summary["params"]["after"] < summary["params"]["before"] and summary["sparsity"] is None

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.num_hidden_layers == 1 and len(reloaded.model.layers) == 1
    out = reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["method.criterion=depth", "method.num_layers_to_drop=2"], "method.num_layers_to_drop"),
        (["model.quantization=nf4"], "model.quantization"),
        (["peft=lora"], "peft.method"),
    ],
)
def test_bad_runs_fail_with_the_key_before_writing_a_model(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as info:
        prune(tmp_path, *overrides)
    assert info.value.key == key and len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.sparsity=1.0", "method.sparsity"),
        ("method.nm_n=4", "method.nm_n"),
        ("method.criterion=random", "method.criterion"),
    ],
)
def test_bad_method_values_fail_validation_with_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["recipe=prune", override]))
    assert info.value.key == key


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_fine_tuning_a_pruned_model_keeps_its_zeros(tmp_path, train_recipe, peft):
    """prune -> sft with trainer.keep_sparsity: full fine-tuning re-zeroes after every step, and
    a LoRA update merged on save is masked too; without the flag the zeros fill in."""
    summary = prune(tmp_path / "pruned", "method.criterion=magnitude", "method.sparsity=0.5")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned" / "final").state_dict()
    args = [
        f"model.name_or_path={tmp_path / 'pruned' / 'final'}",
        f"peft={peft}",
        *(["peft.merge_on_save=true"] if peft == "lora" else []),
        "trainer.max_steps=3",
        "trainer.lr=1e-2",
        "trainer.micro_batch_size=4",
    ]
    for keep in (True, False):
        run = train_recipe("sft", *args, f"trainer.keep_sparsity={keep}", run_dir=tmp_path / f"sft-{keep}")
        tuned = AutoModelForCausalLM.from_pretrained(run.dir / "final").state_dict()
        for name in summary["sparsity"]["per_tensor"]:
            zeros = pruned[name] == 0
            assert tuned[name][zeros].eq(0).all() == keep, (name, keep)
            if keep:
                assert not torch.equal(tuned[name], pruned[name]), f"{name} did not train"
            break
