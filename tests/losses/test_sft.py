"""The SFT loss (polmctl/losses/sft.py) against its formula on hand-computed logits."""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.losses.sft import shifted_token_nll as token_nll

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
