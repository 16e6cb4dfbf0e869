"""The reference model of the methods that keep a policy close to where it started (DPO, KTO,
GRPO / RLOO with method.beta > 0, PPO with method.kl_coef > 0): how it is held, and its log-probs.

    polmctl run recipe=dpo                                     # LoRA: the policy with its adapters off
    polmctl run recipe=dpo peft=none                           # cached log-probs, scored once before training
    polmctl run recipe=dpo peft=none method.precompute_ref_logps=false   # a frozen copy of the start

One mechanism for every such method:
  adapters off   a peft policy is its own reference: the base weights, adapters disabled; no copy
  frozen copy    full fine-tuning: a frozen copy of the starting weights, made before the first update
  cached         offline methods (DPO, KTO) score their training rows once and keep the numbers on disk
                 (safetensors, keyed by model and token ids), shared by every later run on the same data
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class Reference:
    """Runs a function of the reference model: ``reference.run(policy, lambda ref: logps(ref, batch))``."""

    def __init__(self) -> None:
        self.frozen: torch.nn.Module | None = None  # full fine-tuning only

    @staticmethod
    def is_adapter_policy(model: torch.nn.Module) -> bool:
        return hasattr(model, "disable_adapter")

    def freeze(self, model: torch.nn.Module) -> str:
        """Before training: keep a frozen copy of a fully fine-tuned policy (a peft policy needs none).
        Returns how the reference is held, for the run's log."""
        if self.is_adapter_policy(model):
            return "reference: the policy with its adapters disabled, every step"
        if self.frozen is None:
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return "reference: a frozen copy of the starting model"

    @torch.no_grad()
    def run(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], T], *, at_start: bool = False) -> T:
        """``fn(reference)`` in eval mode, without gradients; ``model`` is left in the mode it was in.
        ``at_start``: the policy has not been updated yet, so it is its own reference (no copy is made)."""
        was_training = model.training
        model.eval()
        try:
            if self.frozen is not None:
                return fn(self.frozen)
            if self.is_adapter_policy(model):
                with model.disable_adapter():
                    return fn(model)
            if at_start:
                return fn(model)
            self.freeze(model)  # full fine-tuning without a copy yet: the weights have not moved since the start
            return fn(self.frozen)
        finally:
            model.train(was_training)


def holds_frozen_copy(*, needs_reference: bool, peft_method: str, precomputed: bool = False) -> bool:
    """Whether a run keeps a second, frozen copy of the policy in memory (``polmctl plan`` counts it)."""
    return needs_reference and peft_method == "none" and not precomputed


def cache_key(model_id: str, examples: list[dict]) -> str:
    """Same model (id, dtype, quantization) and same token ids (so same data and tokenisation):
    same cached values, across runs and sweep jobs."""
    digest = hashlib.sha256(model_id.encode())
    for e in examples:
        digest.update(repr(sorted((k, v) for k, v in e.items() if k.endswith("_ids"))).encode())
    return digest.hexdigest()[:24]


def cached_logps(
    cache_dir: Path,
    model_id: str,
    examples: list[dict],
    compute: Callable[[list[dict]], torch.Tensor],
    unit: str = "rows",
) -> tuple[torch.Tensor, str]:
    """The reference log-probs of ``examples`` ([N, k]) from ``cache_dir`` or from ``compute(examples)``
    (then cached: written to a temporary file and renamed, so a killed run leaves no half file).
    Stored as safetensors: nothing in the cache is unpickled. Returns the values and a line for the log."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / f"{cache_key(model_id, examples)}.safetensors"
    if path.exists():
        values = load_file(path).get("ref_logps")
        if values is not None and values.size(0) == len(examples):
            return values, f"reference log-probs: reused {path}"
    values = compute(examples).float().contiguous()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{id(values)}")
    save_file({"ref_logps": values}, str(tmp))
    tmp.replace(path)
    return values, f"reference log-probs: computed once for {len(examples)} {unit}, cached in {path}"
