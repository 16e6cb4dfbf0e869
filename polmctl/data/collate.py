"""Collators: padded batches, or padding-free packed rows.

    polmctl run recipe=continued_pretraining data.packing=true

Packing concatenates a micro-batch's rows into one sequence whose position_ids restart
at 0 for each row (the SFT recipes' default). No token attends across rows: polmctl's
objectives run a packed batch through ``models/packed_attention.py`` (causal SDPA per row);
a plain transformers model called with position_ids, no attention_mask and
``use_cache=False`` derives a block-diagonal mask from the position resets (sdpa, eager;
flash-attention treats them as sequence boundaries). No compute is spent on padding.
"""

from __future__ import annotations

import torch

from polmctl.losses import IGNORE_INDEX


def _check(examples: list[dict]) -> None:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    for i, e in enumerate(examples):
        if not e["input_ids"] or len(e["input_ids"]) != len(e["labels"]):
            raise ValueError(
                f"example {i}: input_ids and labels must be non-empty and of equal length, "
                f"got {len(e['input_ids'])} and {len(e['labels'])}"
            )


def pad_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled -100)."""
    _check(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """One row ``[1, total]`` of concatenated ``input_ids`` and ``labels`` with
    ``position_ids`` restarting at 0 for each example; no attention_mask."""
    _check(examples)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        ids += e["input_ids"]
        # A row's first token has nothing before it in its row; labelling it -100 stops the
        # previous row's last position from being trained to predict it across the boundary.
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        positions += range(len(e["input_ids"]))
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}
