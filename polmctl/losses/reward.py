"""Reward modelling's loss as a pure function of scores.

    polmctl run recipe=reward_model       (the caller: polmctl/methods/reward_model.py)

Matches TRL's ``RewardTrainer.compute_loss`` (with ``center_rewards_coefficient``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-logsig(c - r - margin) + center_coefficient (c + r)^2 per pair ([B] each). The second term
    is TRL RewardTrainer's ``center_rewards_coefficient`` regulariser, which keeps the rewards
    centred on zero; ``margin`` is an optional per-pair required gap. Returns (losses [B],
    {"accuracy": [B], "margin": [B]})."""
    diff = chosen_scores - rejected_scores
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses, {"accuracy": (diff > 0).float(), "margin": diff.detach()}
