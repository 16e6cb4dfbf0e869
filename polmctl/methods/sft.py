"""Supervised fine-tuning: next-token cross-entropy on the trained tokens.

    polmctl run recipe=sft                          # full fine-tuning
    polmctl run recipe=lora                         # the same method through LoRA adapters (qlora, dora, ...)
    polmctl run recipe=continued_pretraining        # every token trained, raw text

Features and the flag that controls each:
  what is trained                   data.completion_only_loss (completion / assistant tokens, or every token)
  padding-free packing              data.packing (the SFT recipes' default; rows attend only to themselves)
  adapters                          peft=lora | dora | prompt_tuning | prefix_tuning | none
The loss (polmctl/losses/sft.py) is summed per micro-batch and divided by the trained tokens of
the whole optimizer step, so gradient accumulation gives the big batch's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import option
from polmctl.data import encode_dataset, pack_collate, pad_collate
from polmctl.engine.contract import LossTerms, Objective
from polmctl.losses import IGNORE_INDEX
from polmctl.losses.sft import token_nll
from polmctl.models.forward import labelled_logits


@dataclass
class SFTMethod:
    name: str = option("sft", "sft: cross-entropy on the trained tokens")


class SFTObjective(Objective):
    """Cross-entropy on the completion (or every) token of padded or packed batches."""

    def __init__(self, method: Any = None):
        self.method = method
        self.pad_token_id, self.packing = 0, False

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id, self.packing = tokenizer.pad_token_id, data.packing
        return encode_dataset(
            rows,
            tokenizer,
            source=data.source,
            fmt=data.format,
            max_length=data.max_length,
            overlong=data.overlong,
            completion_only_loss=data.completion_only_loss,
        )

    def collate(self, examples: list[dict]) -> dict:
        return pack_collate(examples) if self.packing else pad_collate(examples, self.pad_token_id)

    def weight(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        head = labelled_logits(model, inputs, batch["labels"])  # the LM head runs on trained positions only
        nll, tokens = token_nll(head.logits, head.targets)
        return LossTerms(loss_sum=nll, weight=tokens, metrics={"nll_sum": nll.detach()})
