"""Process reward modelling: a label per reasoning step, as a pure function of the step logits.

    polmctl run recipe=prm       (the caller: polmctl/methods/prm.py)

TRL's PRMTrainer trains ``AutoModelForTokenClassification(num_labels=2)`` with the model's own
token-classification loss: the cross-entropy of the two logits at each labelled token (one per
step: its separator's last token) against the step's label, averaged over the labelled tokens.
``step_label_loss`` is that loss per step; the caller sums it and divides by the labelled steps of
the whole optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CORRECT = 1  # the label, and the logit index, of "the solution is still right at this step"


def step_label_loss(step_logits: torch.Tensor, step_labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """-log softmax(z)[y] for each step's two logits z ([N, 2]) and label y ([N], 0 or 1).
    Returns (losses [N], {"accuracy": [N]}: whether the larger logit is the label's)."""
    losses = F.cross_entropy(step_logits.float(), step_labels.long(), reduction="none")
    return losses, {"accuracy": (step_logits.argmax(-1) == step_labels).float()}


def step_scores(step_logits: torch.Tensor) -> torch.Tensor:
    """A step's score: the probability of its ``CORRECT`` label, softmax(z)[1] ([..., 2] -> [...])."""
    return step_logits.float().softmax(-1)[..., CORRECT]
