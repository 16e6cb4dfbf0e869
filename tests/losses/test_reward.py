"""Reward modelling's Bradley-Terry loss (polmctl/losses/reward.py) on hand-computed scores."""

from __future__ import annotations

import pytest

from polmctl.losses.reward import bradley_terry_loss
from tests.losses.formulas import close, grads, softplus, t

pytestmark = pytest.mark.unit


def test_bradley_terry_loss_accuracy_and_margin():
    losses, m = bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0))
    close(losses, [softplus(-1.0), softplus(1.0)])
    close(m["accuracy"], [1.0, 0.0])
    close(m["margin"], [1.0, -1.0])
    losses, _ = bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0), margin=t(0.5, 0.0))
    close(losses, [softplus(-0.5), softplus(1.0)])


def test_bradley_terry_centering_adds_coefficient_times_squared_sum():
    losses, _ = bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0), center_coefficient=0.01)
    close(losses, [softplus(-1.0) + 0.01 * 3.0**2, softplus(1.0) + 0.01 * 1.0**2])
    d_chosen, d_rejected = grads(lambda c, r: bradley_terry_loss(c, r), t(0.5, -1.0), t(0.0, 1.0))
    assert (d_chosen < 0).all() and (d_rejected > 0).all()
