"""What the engine needs from a training method, and what a method hands back each micro-batch.

Every training method (polmctl/methods/) subclasses ``Objective`` and implements ``encode``,
``weight`` and ``__call__`` (plus ``collate`` for data it trains on as it is). The hooks below
have defaults that do nothing, so the train runner and the engine call them all without
probing what a method happens to define.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from polmctl.engine.batches import BatchSource


@dataclass
class LossTerms:
    """A micro-batch's contribution to one optimizer step.

    The engine divides ``loss_sum`` by the summed ``weight`` of all micro-batches in the
    step (across processes too), so the step's loss is an exact mean over tokens (or
    pairs, or sequences) however the step was split into micro-batches.
    ``metrics`` are sums over the micro-batch, averaged by the engine with the same weight;
    a metric over a subset of the batch (e.g. KTO's desirable rows) is a ``(sum, count)``
    pair instead, and the engine divides the step's summed sums by the summed counts.
    """

    loss_sum: torch.Tensor
    weight: torch.Tensor | int
    metrics: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Objective:
    """A training method as the train runner and the engine see it."""

    # Which model the runner loads: causal_lm | reward (a scalar score head) | prm (two labels per token)
    model_head: str = "causal_lm"

    # -- required ------------------------------------------------------------------------------
    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        """Rows -> examples (token ids, or prompts for online methods) and stats with a one-line ``summary()``."""
        raise NotImplementedError

    def weight(self, batch: dict) -> int:
        """The normaliser of this batch (tokens, pairs, sequences), known before the forward pass."""
        raise NotImplementedError

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        raise NotImplementedError

    # -- optional hooks ------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Examples -> one micro-batch of tensors (offline methods; online ones make their own batches)."""
        raise NotImplementedError(f"{type(self).__name__} makes its batches in make_batches, not from examples")

    def heads(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Modules that train beside the model (PPO's value head): attached to it by the runner, so they are
        optimised, checkpointed and resumed with it; final/ is saved without them."""
        return {}

    def prepare(
        self, model: torch.nn.Module, examples: list[dict], *, device: torch.device, model_id: str, cache_dir: Path
    ) -> str | None:
        """Called once before training with the examples the run will visit (e.g. to score them with a
        reference model). Returns a line for the run's log, or None when there was nothing to do."""
        return None

    def make_batches(
        self, examples: list[dict], *, model: torch.nn.Module, tokenizer, cfg, accelerator
    ) -> BatchSource | None:
        """The trainer's batch source: None for the examples in seeded epochs (offline methods), or a
        source that makes each step's batches itself (online methods sample the policy as it trains)."""
        return None
