"""Supervised next-token loss.

polmctl run recipe=sft            (the caller: polmctl/methods/sft.py)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polmctl.losses import IGNORE_INDEX


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of ``targets`` under ``logits`` ([..., V] and [...], aligned:
    ``logits[i]`` predicts ``targets[i]``), and how many targets it covers. Targets equal to
    IGNORE_INDEX are skipped. Returns (sum of -log p, count), so a caller can normalise over the
    tokens of a whole optimizer step rather than one micro-batch."""
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (targets != IGNORE_INDEX).sum()


def shifted_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_nll`` for a causal LM's full output: ``logits[:, t]`` ([B, T, V]) predicts
    ``labels[:, t + 1]`` ([B, T])."""
    return token_nll(logits[:, :-1], labels[:, 1:])
