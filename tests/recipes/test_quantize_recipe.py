"""recipe=quantize end to end on model=tiny: final/ reloads quantized, summary.json reports size on
disk, parameter memory, tokens/s (and the eval tasks) before and after; bad sources are one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from polmctl.compose import compose_config
from polmctl.compress import quantize as Q
from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError
from polmctl.models import load_model
from polmctl.runners.quantize import run_quantize
from polmctl.validate import validate

pytestmark = pytest.mark.recipes
FAST = [
    "model=tiny",
    "eval=none",
    "logger.progress=false",
    "method.speed_prompts=4",
    "method.speed_max_new_tokens=8",
    "method.speed_batch_size=4",
]
TINY_EVAL = ["eval.tasks=[arithmetic,perplexity]", "eval.before=true", "eval.max_samples=4", "eval.max_new_tokens=8"]
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")


def quantize(out: Path, *overrides: str) -> dict:
    cfg = validate(compose_config(["recipe=quantize", *FAST, *overrides, f"output_dir={out}"]))
    return run_quantize(cfg)


def check_summary(out: Path, scheme: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["scheme"] == scheme
    for key in ("size_on_disk_bytes", "param_memory_bytes", "tokens_per_s"):
        entry = summary[key]
        assert entry["before"] > 0 and entry["after"] > 0, key
        assert entry["ratio"] == pytest.approx(entry["after"] / entry["before"]), key
    assert summary["size_on_disk_bytes"]["ratio"] < 0.5 and summary["param_memory_bytes"]["ratio"] < 0.5
    assert summary["generation"]["prompts"] == 4 and summary["generation"]["before"]["tokens"] > 0
    assert summary["quantized_layers"] and summary["full_precision_linears"] == ["lm_head"]
    model = load_model(ModelConfig(name_or_path=str(out)), for_training=False)  # a run dir loads its final/
    assert Q.quantized_layers(model) == summary["quantized_layers"]
    return summary


@needs_bnb
def test_nf4_without_eval_writes_the_size_memory_and_speed_fields(tmp_path):
    quantize(tmp_path / "run")
    summary = check_summary(tmp_path / "run", "nf4")
    assert summary["quantization"] == "bitsandbytes nf4" and summary["quantized_layers"] == {"Linear4bit": 14}
    assert summary["size_on_disk_bytes"]["before_from"] == "the builtin model's cache dir"
    assert summary["eval"] == {"before": None, "after": None} and not (tmp_path / "run" / "source").exists()


@needs_bnb
def test_int8_with_a_tiny_eval_reports_quality_before_and_after(tmp_path):
    quantize(tmp_path / "run", "method.scheme=int8", *TINY_EVAL)
    summary = check_summary(tmp_path / "run", "int8")
    for tag in ("before", "after"):
        assert set(summary["eval"][tag]) == {"arithmetic", "perplexity"}
        assert (tmp_path / "run" / "eval" / f"results-{tag}.json").exists()
    # int8 barely moves the tiny model: perplexity within 1%
    before, after = (summary["eval"][t]["perplexity"]["perplexity"] for t in ("before", "after"))
    assert after == pytest.approx(before, rel=0.01)


@pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="cpu_int8 needs torchao: pip install 'torchao>=0.15' (polmctl's quant extra)",
)
def test_cpu_int8_runs_end_to_end(tmp_path):
    quantize(tmp_path / "run", "method.scheme=cpu_int8")
    summary = check_summary(tmp_path / "run", "cpu_int8")
    assert summary["device"] == "cpu" and summary["quantization"] == "torchao Int8WeightOnlyConfig"


@needs_bnb
def test_a_lora_run_dir_is_merged_saved_as_reference_and_quantized(train_recipe, tmp_path):
    lora = train_recipe("lora", "trainer.max_steps=2", "data.max_rows=16")
    quantize(tmp_path / "q", f"model.name_or_path={lora.dir}")
    summary = check_summary(tmp_path / "q", "nf4")
    assert summary["size_on_disk_bytes"]["before_from"].startswith("a reference copy of the source saved in source/")
    assert (tmp_path / "q" / "source" / "model.safetensors").exists()


@needs_bnb
def test_an_already_quantized_model_is_refused_in_one_line(tmp_path):
    quantize(tmp_path / "first")
    with pytest.raises(ConfigError) as err:
        quantize(tmp_path / "again", f"model.name_or_path={tmp_path / 'first'}", "method.scheme=int8")
    text = str(err.value)
    assert text.startswith(f"model.name_or_path: {tmp_path / 'first'} is already quantized (bitsandbytes nf4)")
    assert "full-precision model" in text and "\n" not in text
    assert not (tmp_path / "again" / "summary.json").exists()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["model.quantization=nf4"],
            "model.quantization: got 'nf4'; the quantize recipe loads the source in full precision",
        ),
        (["method.scheme=int4"], "method.scheme: got 'int4'; allowed: nf4, fp4, int8, cpu_int8"),
    ],
)
def test_bad_input_is_one_config_error_naming_the_key(overrides, needle, tmp_path, capsys):
    from polmctl.entry import run_config

    cfg = compose_config(["recipe=quantize", *FAST, *overrides, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        run_config(cfg)
    assert exit_.value.code != 0
    err = " ".join(capsys.readouterr().err.split())
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()
