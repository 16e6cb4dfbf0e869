"""The DPO method's schema: every loss of losses/preference.py is a value of method.loss, and
exo_pair's epsilon (method.label_smoothing) is refused at 0, naming the key."""

from __future__ import annotations

import pytest

from polmctl.errors import ConfigError
from polmctl.losses.preference import DPO_LOSS_TYPES
from polmctl.methods.preference import DPOMethod

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("loss", DPO_LOSS_TYPES)
def test_every_dpo_loss_is_a_valid_method_loss(loss):
    DPOMethod(loss=loss, label_smoothing=1e-3).check("method")


def test_exo_pair_without_epsilon_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as info:
        DPOMethod(loss="exo_pair").check("method")
    assert info.value.key == "method.label_smoothing" and "1e-3" in str(info.value)


def test_an_unknown_loss_lists_the_new_ones():
    with pytest.raises(ConfigError, match="apo_zero, apo_down, exo_pair, nca_pair, sppo_hard"):
        DPOMethod(loss="kto_pair").check("method")
