"""The SFT loss against its formula on hand-computed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.objectives.base import logits_window
from polmctl.objectives.sft import token_nll

pytestmark = pytest.mark.unit


def test_token_nll_matches_hand_computed_values():
    # One row, vocab 3, logits at positions 0 and 1 predict labels at 1 and 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    nll, count = token_nll(logits, labels)
    # position 0: uniform over 3 -> -log(1/3); position 1: softmax([2,0,0])[0] = e^2 / (e^2 + 2)
    expected = math.log(3) - math.log(math.e**2 / (math.e**2 + 2))
    assert count.item() == 2
    torch.testing.assert_close(nll, torch.tensor(expected), rtol=0, atol=1e-6)


def test_token_nll_ignores_masked_positions_and_the_first_label():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 0] = 3  # the first position is never predicted, so it never counts
    nll, count = token_nll(logits, labels)
    assert count.item() == 0 and nll.item() == 0.0


def test_logits_window_keeps_one_position_before_the_first_label():
    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, 4, 5, -100]])
    keep, cut = logits_window(labels)
    assert keep == 4  # positions 1..4: position 1 predicts the label at 2
    assert cut.tolist() == [[-100, -100, 5, 6], [-100, 4, 5, -100]]


def test_windowed_logits_give_the_same_loss_as_full_logits(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100
    full = tiny_model(input_ids=ids).logits
    keep, cut = logits_window(labels)
    part = tiny_model(input_ids=ids, logits_to_keep=keep).logits
    assert part.shape[1] == keep < full.shape[1]
    torch.testing.assert_close(token_nll(part, cut)[0], token_nll(full, labels)[0], rtol=1e-5, atol=1e-5)
