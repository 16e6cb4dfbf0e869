"""The process reward model's step loss (polmctl/losses/process.py) on hand-computed logits."""

from __future__ import annotations

import pytest
import torch

from polmctl.losses.process import step_label_loss, step_scores
from tests.losses.formulas import close, sigmoid, softplus

pytestmark = pytest.mark.unit


def test_step_loss_is_the_cross_entropy_of_the_two_logits():
    # -log softmax(z)[y] = softplus(z_other - z_y) for two logits.
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0, 1, 0])
    losses, metrics = step_label_loss(logits, labels)
    close(losses, [softplus(-2.0), softplus(-1.0), softplus(2.0), softplus(0.0)])
    close(metrics["accuracy"], [1.0, 1.0, 0.0, 1.0])  # a tie counts for label 0 (argmax takes the first)
    # TRL's worked example (the first two steps): the token-classification loss averages them to 0.220095.
    assert losses[:2].mean().item() == pytest.approx(0.220095, abs=1e-6)


def test_step_score_is_the_probability_of_the_correct_label():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 3.0]])
    close(step_scores(logits), [sigmoid(2.0), sigmoid(-1.0), 0.5])
    assert step_scores(logits.view(1, 3, 2)).shape == (1, 3)


def test_the_gradient_raises_the_labelled_logit():
    logits = torch.zeros(2, 2, requires_grad=True)
    step_label_loss(logits, torch.tensor([1, 0]))[0].sum().backward()
    close(logits.grad.flatten(), [0.5, -0.5, -0.5, 0.5])  # softmax - onehot: down the other, up the label
