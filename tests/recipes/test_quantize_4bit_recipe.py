"""recipe=quantize with the CPU 4-bit schemes (cpu_int4: torchao, hqq) end to end on model=tiny: the
summary's memory and disk fall, final/ reloads quantized for every later command, and a low-rank
(factored) model quantizes too; the bitsandbytes schemes refuse a factored source with the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polmctl.compose import compose_config
from polmctl.compress import quantize as Q
from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError
from polmctl.models import load_model
from polmctl.runners.lowrank import run_lowrank
from polmctl.runners.quantize import run_quantize
from polmctl.validate import validate

pytestmark = pytest.mark.recipes
FAST = [
    "model=tiny",
    "logger.progress=false",
    "method.speed_prompts=4",
    "method.speed_max_new_tokens=8",
    "method.speed_batch_size=4",
    "eval.tasks=[perplexity]",
    "eval.max_samples=4",
]


def quantize(out: Path, *overrides: str) -> dict:
    return run_quantize(validate(compose_config(["recipe=quantize", *FAST, *overrides, f"output_dir={out}"])))


@pytest.mark.parametrize("scheme,kind", [("cpu_int4", "Linear[Int4OpaqueTensor]"), ("hqq", "HQQLinear")])
def test_cpu_4bit_schemes_shrink_the_model_and_final_reloads_quantized(tmp_path, scheme, kind):
    summary = quantize(tmp_path, f"method.scheme={scheme}")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert summary["quantized_layers"] == {kind: 14} and summary["device"] == "cpu"
    # cpu_int4 computes in bfloat16 (its CPU kernel is slow on float32), so its source is measured in bfloat16 too
    assert summary["compute_dtype"] == {"cpu_int4": "bfloat16", "hqq": "float32"}[scheme]
    assert summary["param_memory_bytes"]["ratio"] < 0.45 and summary["size_on_disk_bytes"]["ratio"] < 0.45
    ppl = summary["eval"]
    assert ppl["after"]["perplexity"]["perplexity"] == pytest.approx(ppl["before"]["perplexity"]["perplexity"], rel=0.1)
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path)), for_training=False)  # the run dir's final/
    assert Q.quantized_layers(reloaded) == {kind: 14}
    with pytest.raises(ConfigError, match="is already quantized"):
        quantize(tmp_path / "again", f"model.name_or_path={tmp_path / 'final'}", "method.scheme=hqq")


def test_a_factored_model_quantizes_with_hqq_and_bitsandbytes_refuses_it(tmp_path):
    lowrank = tmp_path / "lowrank"
    run_lowrank(
        validate(
            compose_config(
                ["recipe=lowrank", "model=tiny", "eval=none", "logger.progress=false", f"output_dir={lowrank}"]
            )
        )
    )
    summary = quantize(tmp_path / "q", f"model.name_or_path={lowrank / 'final'}", "method.scheme=hqq")
    # both factors of each of the 14 layers; a factor whose size hqq cannot pack (an odd number of
    # 64-wide groups at 4 bits) keeps full precision, as the summary lists
    kept = [n for n in summary["full_precision_linears"] if n != "lm_head"]
    assert summary["quantized_layers"]["HQQLinear"] + len(kept) == 28 and summary["quantized_layers"]["HQQLinear"] > 0
    assert all(n.endswith((".down", ".up")) for n in kept)
    with pytest.raises(ConfigError, match="method.scheme: .* holds low-rank factors .* use method.scheme=hqq"):
        quantize(tmp_path / "nf4", f"model.name_or_path={lowrank / 'final'}", "method.scheme=nf4")
