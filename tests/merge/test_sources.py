"""Merge inputs: a LoRA adapter read per tensor equals peft's merge_and_unload, and inputs that
do not fit together (architecture, tensor names, shapes, tokenizer) fail naming the first
mismatch, before anything is written."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from polmctl.errors import ModelError
from polmctl.merge.merge import merge_models
from polmctl.merge.sources import LoraAdapter, open_model
from polmctl.methods.merge import MergeMethod
from polmctl.models import materialise_builtin
from polmctl.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return materialise_builtin("tiny")


def save_lora(tiny_dir: Path, out: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], **lora),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero; give the update a value
    model.save_pretrained(out)
    build_tiny_tokenizer().save_pretrained(out)
    return out


def copy_model(tiny_dir: Path, out: Path, edit=None, config_edit=None) -> Path:
    out.mkdir()
    for f in tiny_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if config_edit:
        (out / "config.json").write_text(config_edit((out / "config.json").read_text()))
    return out


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"alpha_pattern": {"q_proj": 2}}])
def test_a_lora_adapter_read_per_tensor_equals_peft_merge_and_unload(tiny_dir, tmp_path, lora):
    path = save_lora(tiny_dir, tmp_path / "lora", seed=0, **lora)
    expected = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], **lora),
    )
    expected.load_adapter(path, adapter_name="default")
    expected = expected.merge_and_unload().state_dict()
    with ExitStack() as stack:
        adapter = open_model(str(path), "lora", stack, None, {})
        assert isinstance(adapter, LoraAdapter) and len(adapter.updates) == 4  # 2 layers x 2 modules
        for name in adapter.names():
            torch.testing.assert_close(adapter.tensor(name).float(), expected[name], rtol=1e-5, atol=1e-6)


def test_merging_a_model_with_itself_gives_it_back(tiny_dir, tmp_path):
    a = save_lora(tiny_dir, tmp_path / "a", seed=1)
    for merge in ("linear", "ties", "slerp"):
        out = tmp_path / merge
        merge_models(MergeMethod(merge=merge, models=[str(a), str(a)], density=1.0), out, seed=0)
        with ExitStack() as stack:
            adapter = open_model(str(a), "a", stack, None, {})
            merged = load_file(str(out / "model.safetensors"))
            for name in adapter.names():
                torch.testing.assert_close(merged[name], adapter.tensor(name).float(), rtol=1e-5, atol=1e-6)


def test_another_architecture_is_named_by_its_config_key(tiny_dir, tmp_path):
    other = copy_model(
        tiny_dir,
        tmp_path / "other",
        config_edit=lambda text: text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'),
    )
    with pytest.raises(ModelError, match=r"method.models\[1\].*num_hidden_layers=3.*has 2"):
        merge_models(MergeMethod(merge="linear", models=[str(tiny_dir), str(other)]), tmp_path / "m", seed=0)
    assert not (tmp_path / "m").exists()


def test_a_missing_or_reshaped_tensor_is_named(tiny_dir, tmp_path):
    missing = copy_model(tiny_dir, tmp_path / "missing", edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelError, match=r"method.models\[1\].*has no tensor model.layers.1.mlp.up_proj.weight"):
        merge_models(MergeMethod(merge="linear", models=[str(tiny_dir), str(missing)]), tmp_path / "m1", seed=0)

    def reshape(t):
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :32].clone()

    reshaped = copy_model(tiny_dir, tmp_path / "reshaped", edit=reshape)
    with pytest.raises(ModelError, match=r"tensor model.layers.0.self_attn.o_proj.weight has shape \(64, 32\)"):
        merge_models(
            MergeMethod(merge="ties", models=[str(tiny_dir), str(reshaped)], base=str(tiny_dir)),
            tmp_path / "m2",
            seed=0,
        )


def test_an_adapter_for_another_base_is_named_by_its_tensor(tiny_dir, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:32].clone()

    other_base = copy_model(tiny_dir, tmp_path / "base2", edit=shrink)
    adapter = save_lora(tiny_dir, tmp_path / "lora", seed=0)
    config = (adapter / "adapter_config.json").read_text().replace(str(tiny_dir), str(other_base))
    (adapter / "adapter_config.json").write_text(config)
    with pytest.raises(
        ModelError,
        match=r"adapter tensor .*layers.0.self_attn.q_proj.lora_A.weight gives "
        r"model.layers.0.self_attn.q_proj.weight the shape \(64, 64\)",
    ):
        merge_models(MergeMethod(merge="linear", models=[str(adapter), str(tiny_dir)]), tmp_path / "m", seed=0)


def test_another_tokenizer_is_refused(tiny_dir, tmp_path):
    other = copy_model(tiny_dir, tmp_path / "other")
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    (other / "tokenizer.json").unlink()
    tokenizer.save_pretrained(other)
    with pytest.raises(ModelError, match=r"method.models\[1\].*tokenizer differs.*'<extra>'"):
        merge_models(MergeMethod(merge="linear", models=[str(tiny_dir), str(other)]), tmp_path / "m", seed=0)


def test_quantized_and_dora_inputs_are_refused(tiny_dir, tmp_path):
    dora = save_lora(tiny_dir, tmp_path / "dora", seed=0, use_dora=True)
    with pytest.raises(ModelError, match="DoRA adapter"):
        merge_models(MergeMethod(merge="linear", models=[str(dora), str(tiny_dir)]), tmp_path / "m", seed=0)
    quantized = copy_model(
        tiny_dir,
        tmp_path / "q",
        config_edit=lambda text: text.replace("{", '{"quantization_config": {"quant_method": "bitsandbytes"}, ', 1),
    )
    with pytest.raises(ModelError, match="holds bitsandbytes weights"):
        merge_models(MergeMethod(merge="linear", models=[str(tiny_dir), str(quantized)]), tmp_path / "m", seed=0)
