"""bitsandbytes quantization: nf4, fp4 and int8 load, run and train LoRA on CPU (bitsandbytes 0.50 has a
CPU backend); the CUDA path is checked where a GPU exists; missing or unusable bitsandbytes is one error."""

from __future__ import annotations

import sys

import pytest
import torch

from polmctl.config.schema import ModelConfig, PeftConfig
from polmctl.errors import ModelError
from polmctl.models import apply_peft, load_model, load_tokenizer, save_model, trainable_parameter_summary

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.unit
IDS = torch.tensor([[5, 60, 7, 80, 9, 100, 33]])
LAYER_TYPE = {"nf4": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def quantized(quantization: str, **kw) -> ModelConfig:
    return ModelConfig(name_or_path="builtin:tiny", quantization=quantization, **kw)


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_quantized_forward_on_cpu_is_close_to_full_precision(quantization):
    model = load_model(quantized(quantization), for_training=False)
    assert model.is_quantized
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LAYER_TYPE[quantization])
    assert q_proj.weight.dtype == (torch.int8 if quantization == "int8" else torch.uint8)
    if quantization != "int8":
        assert q_proj.weight.quant_state.quant_type == quantization and q_proj.compute_dtype == torch.float32
    full = load_model(ModelConfig(name_or_path="builtin:tiny"), for_training=False)
    with torch.no_grad():
        error = (model(input_ids=IDS).logits.float() - full(input_ids=IDS).logits).abs().max().item()
    assert error < 0.2  # 4-bit error on the tiny model is ~0.08, int8 ~0.005; logits are O(1)


def test_double_quant_follows_the_config():
    on = load_model(quantized("nf4", double_quant=True), for_training=False).model.layers[0].self_attn.q_proj
    off = load_model(quantized("nf4", double_quant=False), for_training=False).model.layers[0].self_attn.q_proj
    assert on.weight.quant_state.nested and not off.weight.quant_state.nested


@pytest.mark.parametrize("quantization", ["nf4", "int8"])  # fp4 shares nf4's code path but for the table
def test_qlora_trains_on_cpu(quantization):
    model = apply_peft(load_model(quantized(quantization)), PeftConfig(method="lora", r=4, dropout=0.0))
    frozen = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    trainable, total = trainable_parameter_summary(model)
    assert 0 < trainable < total
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3  # ~5.53 -> ~4.95, as without quantization
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, frozen)


def test_qlora_with_gradient_checkpointing_gets_gradients():
    model = apply_peft(load_model(quantized("nf4", gradient_checkpointing=True)), PeftConfig(method="lora", r=4))
    assert model.get_base_model().is_activation_checkpointing
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_full_finetuning_of_a_quantized_model_is_refused():
    with pytest.raises(ModelError, match="use peft.method=lora"):
        apply_peft(load_model(quantized("nf4")), PeftConfig(method="none"))


def test_a_qlora_adapter_saves_but_does_not_merge(tmp_path):
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
    model = apply_peft(load_model(quantized("nf4")), PeftConfig(method="lora", r=4))
    with pytest.raises(ModelError, match="merging adapters into a quantized base is not supported"):
        save_model(model, tok, tmp_path / "merged", merge_adapters=True)
    assert not (tmp_path / "merged").exists()
    out = save_model(model, tok, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").exists()


def test_missing_bitsandbytes_is_one_error_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ModelError, match=r"needs a working bitsandbytes .*pip install -U bitsandbytes"):
        load_model(quantized("nf4"))


def test_a_device_bitsandbytes_cannot_use_is_one_error(monkeypatch):
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"})
    with pytest.raises(ModelError, match="does not run on cpu"):
        load_model(quantized("int8"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested above)")
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_on_gpu(quantization):
    model = apply_peft(load_model(quantized(quantization), device="cuda"), PeftConfig(method="lora", r=4))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.weight.device.type == "cuda"
    if quantization == "nf4":
        assert q_proj.compute_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    loss = model(input_ids=IDS.cuda(), labels=IDS.cuda()).loss
    loss.backward()
    assert torch.isfinite(loss)
