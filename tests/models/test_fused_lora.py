"""LoRA's update fused into one addmm (models/fused_lora.py): peft's outputs, gradients and merges."""

from __future__ import annotations

import pytest
import torch

from polmctl.config.schema import PeftConfig
from polmctl.models import apply_peft
from polmctl.models.fused_lora import FusedLoraVariant, fuse_lora_layers

pytestmark = pytest.mark.unit


def lora(tiny_model, method: str = "lora"):
    torch.manual_seed(0)
    model = apply_peft(tiny_model, PeftConfig(method=method, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B = 0 at init would hide the adapter's contribution
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def output_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float().pow(2).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_gives_peft_outputs_and_gradients(tiny_model):
    model = lora(tiny_model)
    layers = [m for m in model.modules() if hasattr(m, "lora_variant") and m.lora_variant]
    assert layers and all(isinstance(v, FusedLoraVariant) for m in layers for v in m.lora_variant.values())
    ids = torch.randint(5, 200, (2, 9))
    fused, fused_grads = output_and_grads(model, ids)
    for m in layers:
        m.lora_variant.clear()  # peft's own forward
    plain, plain_grads = output_and_grads(model, ids)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and any("lora_A" in n for n in fused_grads)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad(), model.disable_adapter():
        assert (fused - model(input_ids=ids).logits).abs().max() > 1e-3  # the adapter acts


def test_merging_a_fused_adapter_is_plain_lora(tiny_model):
    model = lora(tiny_model)
    ids = torch.randint(5, 200, (1, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_dora_layers_keep_their_own_variant(tiny_model):
    model = lora(tiny_model, "dora")
    assert fuse_lora_layers(model) == 0
    variants = [v for m in model.modules() if hasattr(m, "lora_variant") for v in m.lora_variant.values()]
    assert variants and not any(isinstance(v, FusedLoraVariant) for v in variants)


def test_weights_partitioned_by_zero3_are_read_through_the_module_call(tiny_model):
    """ZeRO-3 gathers a module's weights in its forward hooks: B (and A) must be called as modules,
    not read, when their weights carry DeepSpeed's ``ds_id`` (a rank holds only a slice of them)."""
    model = lora(tiny_model)
    ids = torch.randint(5, 200, (1, 7))
    with torch.no_grad():
        fused = model(input_ids=ids).logits
    calls = []
    for name, module in model.named_modules():
        if name.endswith("lora_B.default"):
            module.weight.ds_id = 0  # what DeepSpeed sets on a partitioned parameter
            module.register_forward_pre_hook(lambda module, args: calls.append(module))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fused, rtol=1e-5, atol=1e-5)
    assert calls and len(calls) == sum(1 for n, _ in model.named_modules() if n.endswith("lora_B.default"))
