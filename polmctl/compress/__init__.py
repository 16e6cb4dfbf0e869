"""Compression (the efficiency paradigm): pruning, keeping the zeros through fine-tuning,
quantization and low-rank factoring.

  polmctl.compress.prune     importance scores and keep-masks (magnitude, Wanda, N:M, ShortGPT
                             Block Influence), the calibration pass, layer dropping
  polmctl.compress.sparsity  ``SparsityMasks``: re-zero pruned weights after each optimizer step
                             and before a merged save
  polmctl.compress.quantize  post-training weight quantization (recipe=quantize)
  polmctl.compress.lowrank   truncated-SVD factors of Linear layers, plain or activation-aware (recipe=lowrank)

The ``method`` nodes of recipe=prune, recipe=quantize and recipe=lowrank are in polmctl/methods/. Modules load on
first use: ``from polmctl.compress import SparsityMasks`` works.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SparsityMasks"]


def __getattr__(name: str) -> Any:
    if name == "SparsityMasks":
        from polmctl.compress.sparsity import SparsityMasks

        return SparsityMasks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
