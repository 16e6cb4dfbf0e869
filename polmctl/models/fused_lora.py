"""Plain LoRA on Linear layers with its update fused into one matmul: ``addmm(W x, A x, B^T, alpha=s)``.

    polmctl run recipe=lora          # every LoRA (not DoRA) Linear layer of a trained adapter uses it

peft computes ``result + lora_B(lora_A(x)) * scaling``: B's output, its scaled copy and the sum
are three passes over a [tokens, out_features] tensor forward and more backward, ~10% of a
LoRA SFT step on SmolLM2 on CPU. ``torch.addmm`` adds the scaled low-rank product into the
base output in the matmul itself. Same function, same parameters and gradients up to float
rounding (tests/models/test_fused_lora.py). Written as a peft ``LoraVariant``, peft's own hook
for other LoRA forwards (DoRA is one), installed on layers that have no variant; merging is
plain LoRA's (W + s B A), so merge_and_unload, export and merged sampling are unchanged.
Falls back to peft's expression where addmm does not apply (a bias on B, dtypes that differ).
"""

from __future__ import annotations

import torch
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
        low_rank = lora_A(module.lora_dropout[active_adapter](x))
        if lora_B.bias is not None or low_rank.dtype != result.dtype or lora_B.weight.dtype != result.dtype:
            return result + lora_B(low_rank) * scaling  # peft's own expression
        out = torch.addmm(
            result.reshape(-1, result.size(-1)),
            low_rank.reshape(-1, low_rank.size(-1)),
            lora_B.weight.t(),
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
    return fused
