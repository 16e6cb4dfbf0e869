"""Keep a pruned model's zeros through later fine-tuning.

    from polmctl.compress.sparsity import SparsityMasks

    masks = SparsityMasks.from_model(model, min_sparsity=0.1)  # before or after apply_peft
    ...
    optimizer.step()
    masks.apply(model)                       # after every optimizer step: re-zero in place
    ...
    merged = peft_model.merge_and_unload()   # a merged LoRA update is dense again
    masks.apply(merged)                      # or: masks.apply_to_state_dict(state_dict)

API:
  ``SparsityMasks.from_model(model, min_sparsity=0.1) -> SparsityMasks``
      A boolean keep-mask (True: the weight may be non-zero) for every floating-point weight
      tensor of two or more dims whose fraction of exact zeros is at least ``min_sparsity``
      (dense tensors have almost none, so they are not recorded). Adapter tensors (``lora_*``,
      and whatever carries the peft tuner's prefix) are never recorded: LoRA's B starts at zero.
      Masks live on each tensor's device (moved once if the model moves).
  ``masks.apply(model) -> int``
      Re-zeroes, in place and without autograd, every masked entry of every recorded tensor
      found in ``model``; returns how many tensors it touched.
  ``masks.apply_to_state_dict(state_dict) -> state_dict``
      The same on a state dict (its masked tensors are replaced by masked copies; the dict is
      returned), for a merged model's weights before they are saved.
  ``masks.violations(model) -> int``: masked entries that are non-zero now (0 after ``apply``).
  ``masks.sparsity() -> dict[str, float]``: the recorded zero fraction of each tensor.
  ``len(masks)``, ``name in masks``, ``masks.names``, ``masks.masks`` (name -> keep-mask).

Tensors are matched by their canonical name, the name in the plain transformers model
(``model.layers.0.mlp.up_proj.weight``): a peft wrapper's ``base_model.model.`` prefix, DDP's
``module.``, torch.compile's ``_orig_mod.``, LoRA's ``.base_layer`` and ``modules_to_save``'s
``.original_module`` / ``.modules_to_save.<adapter>`` are stripped, so masks taken from the
plain model apply to its LoRA-wrapped or accelerate-wrapped form, to a merged model and to
either's state dict, and the other way round. A recorded tensor that a model does not have
is skipped; one with another shape is an error (the masks belong to another model).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")  # DDP, torch.compile, peft
ADAPTER_MARKERS = ("lora_",)


def canonical_name(name: str) -> str:
    """The parameter's name in the plain model: DDP / torch.compile / peft wrapper parts removed."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    parts, out, skip = name.split("."), [], False
    for i, part in enumerate(parts):
        if skip:
            skip = False
            continue
        if part in ("base_layer", "original_module"):
            continue
        if part == "modules_to_save" and i + 1 < len(parts) - 1:
            skip = True  # and the adapter name after it
            continue
        out.append(part)
    return ".".join(out)


def _adapter_markers(model: nn.Module) -> tuple[str, ...]:
    prefix = getattr(getattr(model, "base_model", None), "prefix", None)
    return ADAPTER_MARKERS + ((prefix,) if isinstance(prefix, str) and prefix else ())


class SparsityMasks:
    """Boolean keep-masks by canonical weight name; see the module docstring for the API."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = {name: mask.bool() for name, mask in masks.items()}

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, min_sparsity: float = 0.1) -> "SparsityMasks":
        if not 0 < min_sparsity <= 1:
            raise ValueError(f"min_sparsity must be in (0, 1], got {min_sparsity!r}")
        markers = _adapter_markers(model)
        masks = {}
        for name, p in model.named_parameters():
            if p.dim() < 2 or not p.is_floating_point() or any(m in name for m in markers):
                continue
            zeros = p == 0
            if zeros.sum().item() >= min_sparsity * p.numel():
                masks.setdefault(canonical_name(name), ~zeros)
        return cls(masks)

    # -- what is recorded ------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: str) -> bool:
        return canonical_name(name) in self.masks

    def __repr__(self) -> str:
        return f"SparsityMasks({len(self)} tensors)"

    def sparsity(self) -> dict[str, float]:
        return {name: 1 - mask.float().mean().item() for name, mask in self.masks.items()}

    # -- applying --------------------------------------------------------------------------
    def _drop_mask(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """~keep on ``tensor``'s device; the keep-mask moves there once (one copy is kept)."""
        mask = self.masks[name]
        if mask.shape != tensor.shape:
            raise ValueError(
                f"sparsity mask for {name} has shape {tuple(mask.shape)}, the tensor "
                f"{tuple(tensor.shape)}; the masks belong to another model"
            )
        if mask.device != tensor.device:
            mask = self.masks[name] = mask.to(tensor.device)
        return ~mask

    def _matches(self, items) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in items:
            canonical = canonical_name(name)
            if canonical in self.masks:
                yield canonical, tensor

    @torch.no_grad()
    def apply(self, model: nn.Module) -> int:
        touched = 0
        for name, p in self._matches(model.named_parameters()):
            p.masked_fill_(self._drop_mask(name, p), 0)
            touched += 1
        return touched

    @torch.no_grad()
    def apply_to_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key in list(state_dict):
            canonical = canonical_name(key)
            if canonical in self.masks:
                tensor = state_dict[key]
                state_dict[key] = tensor.masked_fill(self._drop_mask(canonical, tensor), 0)
        return state_dict

    @torch.no_grad()
    def violations(self, model: nn.Module) -> int:
        return sum(
            int((p[self._drop_mask(name, p)] != 0).sum().item()) for name, p in self._matches(model.named_parameters())
        )
