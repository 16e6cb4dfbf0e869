"""Supervised fine-tuning: next-token cross-entropy on the trained tokens.

    polmctl run recipe=sft            # full fine-tuning
    polmctl run recipe=lora           # the same objective through LoRA adapters

``token_nll`` is the pure loss; ``SFTObjective`` runs the model on a batch and hands the
engine a sum of losses and the number of tokens it covers, so that gradient
accumulation normalises by the tokens of the whole optimizer step, not per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from polmctl.data import encode_dataset, pack_collate, pad_collate
from polmctl.objectives.base import LossTerms, labelled_logits

IGNORE_INDEX = -100


@dataclass
class SFTMethod:
    objective: str = field(default="sft", metadata={"help": "sft: cross-entropy on the trained tokens"})


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of tokens it covers.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled -100 are skipped.
    Returns (sum of -log p, count) so callers can normalise over several batches.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, (shift_labels != IGNORE_INDEX).sum()


class SFTObjective:
    """Cross-entropy on the completion (or every) token of padded or packed batches."""

    def __init__(self, method: SFTMethod):
        self.method = method
        self.pad_token_id, self.packing = 0, False

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id, self.packing = tokenizer.pad_token_id, data.packing
        return encode_dataset(rows, tokenizer, source=data.source, fmt=data.format, max_length=data.max_length,
                              overlong=data.overlong, completion_only_loss=data.completion_only_loss)

    def collate(self, examples: list[dict]) -> dict:
        return pack_collate(examples) if self.packing else pad_collate(examples, self.pad_token_id)

    def weight(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        head = labelled_logits(model, inputs, batch["labels"])  # the LM head runs on trained positions only
        nll = F.cross_entropy(head.logits.float(), head.targets, reduction="sum")
        return LossTerms(loss_sum=nll, weight=head.targets.numel(), metrics={"nll_sum": nll.detach()})
