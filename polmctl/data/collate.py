"""Collators: padded batches, or padding-free packed rows.

    polmctl run recipe=continued_pretraining data.packing=true

Packing concatenates a micro-batch's rows into one sequence whose position_ids restart
at 0 for each row; transformers builds a block-diagonal causal mask from those position
ids (sdpa and eager attention), so no token attends across rows and no compute is spent
on padding.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def pad_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    ids, labels, positions = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        # The first token of a row has no prediction within its row; masking it stops the
        # previous row's last position from being trained to predict it.
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        positions += range(n)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions])}
