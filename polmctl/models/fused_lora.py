"""Plain LoRA on Linear layers with its update fused into one matmul: ``addmm(W x, A x, B^T, alpha=s)``.

    polmctl run recipe=lora          # every LoRA (not DoRA) Linear layer of a trained adapter uses it

peft computes ``result + lora_B(lora_A(x)) * scaling``: B's output, its scaled copy and the sum
are three passes over a [tokens, out_features] tensor forward and more backward, ~10% of a
LoRA SFT step on SmolLM2 on CPU. ``torch.addmm`` adds the scaled low-rank product into the
base output in the matmul itself. Same function, same parameters and gradients up to float
rounding (tests/models/test_fused_lora.py). Written as a peft ``LoraVariant``, peft's own hook
for other LoRA forwards (DoRA is one), installed on layers that have no variant; merging is
plain LoRA's (W + s B A), so merge_and_unload, export and merged sampling are unchanged.
Falls back to peft's expression where addmm does not apply (a bias on B) or
cannot read the weights (partitioned by DeepSpeed ZeRO-3).

With a bf16 (or fp16) base and peft's float32 adapters the update is computed in the base's
dtype, from the input as it comes and A and B cast down, as ``torch.autocast`` would: peft's
own path casts the [tokens, hidden] input up for every adapted layer, adds a float32
[tokens, out] product to the bf16 result and casts the sum back, which made bf16 LoRA steps
slower than float32 ones on CPU. The parameters, their gradients and the optimizer state stay
float32 (the casts of A and B are in the graph). peft's own input cast is switched off on the
fused layers (``cast_input_dtype_enabled``, peft's knob for callers that cast themselves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant


class FusedLoraVariant(LoraVariant):
    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass  # plain LoRA's parameters, created by peft

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaling = module.scaling[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        # peft's own expression, in the adapters' dtype: with a bias on B, or with weights partitioned by
        # ZeRO-3 (``ds_id``), which gathers a module's weights when the module is called, not when read.
        if lora_B.bias is not None or hasattr(lora_B.weight, "ds_id"):
            return result + lora_B(lora_A(dropout(x.to(lora_A.weight.dtype)))) * scaling
        compute = result.dtype  # float32 adapters on a bf16 base: A and B cast down, not x and result up
        if lora_A.weight.dtype == compute:
            low_rank = lora_A(dropout(x.to(compute)))  # the module itself, so its hooks see the call
        else:
            low_rank = F.linear(dropout(x.to(compute)), lora_A.weight.to(compute))
        out = torch.addmm(
            result.reshape(-1, result.size(-1)),
            low_rank.reshape(-1, low_rank.size(-1)),
            lora_B.weight.to(compute).t(),
            alpha=scaling,
        )
        return out.view(result.shape)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every plain LoRA adapter of a peft model's Linear layers the fused forward; returns how
    many (layer, adapter) pairs now use it. Layers with a variant of their own (DoRA, ...) keep it."""
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is not LoraLinear:  # not bitsandbytes/torchao subclasses: their base output differs
            continue
        for name in module.lora_A:
            if name not in module.lora_variant:
                module.lora_variant[name] = FusedLoraVariant()
                fused += 1
        if all(isinstance(v, FusedLoraVariant) for v in module.lora_variant.values()):
            module.cast_input_dtype_enabled = False  # the variant casts (see the module docstring)
    return fused
