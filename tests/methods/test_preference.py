"""The pairwise methods' schema: every loss of losses/preference.py is a value of method.loss,
exo_pair's epsilon (method.label_smoothing) is refused at 0, naming the key; method.sft_weight adds
the chosen answer's per-token NLL (RPO for DPO, CPO-SimPO for SimPO, the papers' term for CPO/ORPO).

.venv/bin/python -m pytest tests/methods/test_preference.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.errors import ConfigError
from polmctl.losses.preference import DPO_LOSS_TYPES
from polmctl.methods.preference import CPOMethod, DPOMethod, ORPOMethod, SimPOMethod

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


def _objective_loss(method, monkeypatch, logps, lengths, ref=None):
    """The objective's loss_sum and metrics on fixed log-probs (chosen first, then rejected)."""
    from polmctl.methods import preference

    monkeypatch.setattr(preference, "sequence_logps", lambda model, batch: (logps, lengths))
    batch = {"input_ids": torch.zeros(len(logps), 3, dtype=torch.long)}
    if ref is not None:
        batch["ref_logps"] = ref
    return preference.PairwiseObjective(method)(None, batch)


def test_dpo_sft_weight_adds_the_chosen_answers_per_token_nll_by_hand(monkeypatch):
    # chosen -6 over 3 tokens and -4 over 2; rejected -8 and -4; the reference equals the policy on
    # pair 2 and is 1 nat lower on pair 1's chosen answer: beta h = 0.5 x 1 and 0.
    logps, lengths = torch.tensor([-6.0, -4.0, -8.0, -4.0]), torch.tensor([3, 2, 4, 2])
    ref = torch.tensor([[-7.0, -8.0], [-4.0, -4.0]])
    plain = _objective_loss(DPOMethod(beta=0.5), monkeypatch, logps, lengths, ref)
    rpo = _objective_loss(DPOMethod(beta=0.5, sft_weight=0.5), monkeypatch, logps, lengths, ref)
    dpo_terms = math.log1p(math.exp(-0.5)) + math.log(2)
    nll = 6 / 3 + 4 / 2
    assert plain.loss_sum.item() == pytest.approx(dpo_terms, abs=1e-6)
    assert rpo.loss_sum.item() == pytest.approx(dpo_terms + 0.5 * nll, abs=1e-6)
    assert rpo.metrics["nll"].item() == pytest.approx(nll) and "nll" not in plain.metrics


@pytest.mark.parametrize(
    "method", [SimPOMethod(), CPOMethod(sft_weight=0.0), ORPOMethod(sft_weight=0.0), DPOMethod(loss="ipo")]
)
def test_sft_weight_adds_the_same_nll_to_every_pairwise_method(method, monkeypatch):
    logps, lengths = torch.tensor([-6.0, -4.0, -8.0, -5.0]), torch.tensor([3, 2, 4, 2])
    ref = torch.tensor([[-7.0, -8.0], [-4.0, -4.0]])
    without = _objective_loss(method, monkeypatch, logps, lengths, ref).loss_sum
    method.sft_weight = 2.0
    with_nll = _objective_loss(method, monkeypatch, logps, lengths, ref).loss_sum
    assert (with_nll - without).item() == pytest.approx(2.0 * (6 / 3 + 4 / 2), abs=1e-5)


def test_cpo_and_orpo_keep_their_papers_sft_term_and_a_negative_weight_is_refused():
    assert CPOMethod().sft_weight == ORPOMethod().sft_weight == 1.0
    assert DPOMethod().sft_weight == SimPOMethod().sft_weight == 0.0
    with pytest.raises(ConfigError) as info:
        SimPOMethod(sft_weight=-1.0).check("method")
    assert info.value.key == "method.sft_weight"
