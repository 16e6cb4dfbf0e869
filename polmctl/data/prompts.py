"""Prompt rows of the online methods, and their sampled completions as training sequences.

    polmctl run recipe=grpo | rloo | ppo | rejection_sampling | distill method.on_policy_fraction=0.5

An online method trains on prompts: it keeps the rows (the prompt and whatever columns its
rewards read), samples completions with the policy, and trains on prompt + completion with
labels on the completion only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polmctl.data.preference import pad_sequences
from polmctl.errors import DataError
from polmctl.losses import IGNORE_INDEX


def prompt_of(row: dict) -> Any:
    """The prompt of a prompt/completion row, or the messages before the last assistant turn."""
    if "prompt" in row:
        return row["prompt"]
    return row["messages"][:-1]


@dataclass
class PromptStats:
    rows: int

    def summary(self) -> str:
        return f"{self.rows} prompts"


def prompt_rows(rows: list[dict], source: str) -> tuple[list[dict], PromptStats]:
    """The rows an online method samples for, checked to have a prompt (the rollout renders and
    tokenizes them when it samples)."""
    for i, row in enumerate(rows):
        if "prompt" not in row and "messages" not in row:
            raise DataError(
                f"{source}: row {i} has no 'prompt' (or 'messages') column; online methods sample answers for prompts"
            )
    return list(rows), PromptStats(len(rows))


def completion_batches(
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_id: int,
    micro_batch_size: int,
    **per_row: torch.Tensor,
) -> list[dict]:
    """Prompt + completion token sequences, labels on the completion only, in right-padded
    micro-batches of ``micro_batch_size`` rows, each with its slice of the ``per_row`` tensors
    (GRPO: advantages; PPO: scores). An empty completion is scored as a lone EOS token."""
    sequences, labels = [], []
    for prompt, completion in zip(prompts, completions):
        completion = completion or [eos_token_id]
        sequences.append(prompt + completion)
        labels.append([IGNORE_INDEX] * len(prompt) + completion)
    batches = []
    for start in range(0, len(sequences), micro_batch_size):
        end = start + micro_batch_size
        batch = pad_sequences(sequences[start:end], labels[start:end], pad_token_id)
        batch.update({name: values[start:end] for name, values in per_row.items()})
        batches.append(batch)
    return batches
