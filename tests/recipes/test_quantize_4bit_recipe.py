"""recipe=quantize with the CPU 4-bit schemes (cpu_int4: torchao, hqq) end to end on model=tiny: the
summary's memory and disk fall, final/ reloads quantized for every later command, and a low-rank
(factored) model quantizes too; the bitsandbytes schemes refuse a factored source with the fix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
    reason="gptqmodel and optimum are not installed (pip install 'polmctl[gptq]'; see tests/compress/test_gptq.py)",
)
def test_gptq_calibrates_on_the_runs_data_and_final_reloads_quantized(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    summary = quantize(tmp_path / "run", "method.scheme=gptq", "method.calibration_rows=16")
    # GPTQModel's per-layer logs (it writes them under ./logs) land in the run dir, not where the user stands
    assert list((tmp_path / "run" / "logs").glob("gptq_log_*.log")) and list(cwd.iterdir()) == []
    assert summary["calibration"] == {"source": "builtin:arithmetic", "split": "train", "rows": 16}
    assert sum(summary["quantized_layers"].values()) == 14 and summary["quantization"] == "gptq"
    assert summary["param_memory_bytes"]["ratio"] < 0.5 and summary["size_on_disk_bytes"]["ratio"] < 0.5
    ppl = summary["eval"]
    assert ppl["after"]["perplexity"]["perplexity"] == pytest.approx(ppl["before"]["perplexity"]["perplexity"], rel=0.1)
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path / "run")), for_training=False)
    assert sum(Q.quantized_layers(reloaded).values()) == 14


@pytest.mark.parametrize("scheme,kind", [("cpu_int4", "Linear[Int4OpaqueTensor]"), ("hqq", "HQQLinear")])
def test_keep_quantizes_the_adapters_base_and_keeps_the_adapter_unmerged_beside_it(
    train_recipe, tmp_path, scheme, kind
):
    """QLoRA-style serving: the base's decoder Linears at 4 bits, the trained adapter unmerged in full
    precision over them; final/ is the adapter, final/base/ the base, and the pair moves together."""
    import shutil

    from safetensors.torch import load_file

    lora = train_recipe("lora", "trainer.max_steps=3", "data.max_rows=16")
    summary = quantize(
        tmp_path / "q", f"model.name_or_path={lora.dir}", f"method.scheme={scheme}", "method.adapter=keep"
    )
    final = tmp_path / "q" / "final"
    assert summary["adapter"] == "keep" and summary["quantized_layers"] == {kind: 14}
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == "./base"
    assert (final / "adapter_model.safetensors").read_bytes() == (
        lora.dir / "final" / "adapter_model.safetensors"
    ).read_bytes()
    parts = Q.weights_bytes(final / "base") + (final / "adapter_model.safetensors").stat().st_size
    assert summary["size_on_disk_bytes"]["after"] == parts  # on tiny the rank-16 adapter outweighs the saving
    ppl = summary["eval"]
    assert ppl["after"]["perplexity"]["perplexity"] == pytest.approx(ppl["before"]["perplexity"]["perplexity"], rel=0.1)

    moved = shutil.copytree(final, tmp_path / "elsewhere" / "model")  # ./base resolves against the adapter dir
    reloaded = load_model(ModelConfig(name_or_path=str(moved)), for_training=False)
    assert hasattr(reloaded, "peft_config") and Q.quantized_layers(reloaded) == {kind: 14}
    trained = load_file(str(final / "adapter_model.safetensors"))
    state = reloaded.state_dict()
    for key, value in trained.items():  # the adapter's weights as trained (peft drops ".default" on save)
        loaded = state[key.replace(".weight", ".default.weight")]
        torch.testing.assert_close(loaded.to(value.dtype), value, rtol=0, atol=0)


def test_keep_needs_an_adapter_and_an_in_place_scheme(tmp_path):
    with pytest.raises(ConfigError, match="method.adapter: keep quantizes an adapter's base .* holds no adapter"):
        quantize(tmp_path / "q", "method.scheme=hqq", "method.adapter=keep")
    with pytest.raises(ConfigError, match="method.adapter: keep quantizes the base in polmctl's layout"):
        quantize(tmp_path / "q2", "method.scheme=nf4", "method.adapter=keep")
