"""The unlearning losses against their papers' formulas and the official code's numbers.

.venv/bin/python -m pytest tests/losses/test_unlearn.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polmctl.losses.unlearn import gradient_ascent_loss, npo_loss, retain_kl, simnpo_loss
from tests.losses.formulas import close, softplus, t

pytestmark = pytest.mark.unit

# One forget answer of 3 tokens with probabilities 0.5, 0.5, 0.25 under the policy and 0.5 each under the
# reference (/tmp/refs/ex_unlearn.py runs the official TOFU code's get_batch_loss on these): summed
# log-probs ln 1/16 and ln 1/8, so NLL 2.772589 and 2.079442.
POLICY, REF, LENGTH = t(math.log(0.5 * 0.5 * 0.25)), t(math.log(0.5**3)), t(3)


def test_npo_matches_its_formula_and_the_official_code():
    # -(2 / beta) logsig(-beta (log pi - log pi_ref)) = -(2 / beta) logsig(beta (NLL - NLL_ref))
    #                                                = (2 / beta) softplus(-beta (NLL - NLL_ref))
    losses = npo_loss(POLICY, REF, beta=0.1)
    close(losses, [20 * softplus(-0.1 * (2.772589 - 2.079442))])
    close(losses, [13.181806])  # NPO repo, TOFU/dataloader.py loss_type "npo"


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_npo_starts_at_2_ln2_over_beta_with_gradient_ascents_gradient(beta):
    policy = t(-4.0, -9.5).requires_grad_()
    losses = npo_loss(policy, policy.detach(), beta=beta)
    close(losses, [2 * math.log(2) / beta] * 2)
    losses.sum().backward()
    # d/dlogp of -(2/beta) logsig(-beta x) at x = 0: 2 sig(0) = 1, gradient ascent's on the summed log-prob
    close(policy.grad, [1.0, 1.0])


def test_npo_gradient_fades_as_the_answer_falls_below_the_reference():
    policy = t(-2.0, -12.0, -40.0).requires_grad_()
    npo_loss(policy, t(-2.0, -2.0, -2.0), beta=0.1).sum().backward()
    # 2 sig(beta (logp - ref)): 1, 2 sig(-1) = 0.537883, 2 sig(-3.8) = 0.043737
    close(policy.grad, [1.0, 2 / (1 + math.exp(1)), 2 / (1 + math.exp(3.8))])


def test_gradient_ascent_is_the_mean_token_log_prob():
    close(gradient_ascent_loss(POLICY / LENGTH), [-0.924196])  # -(HF's mean token NLL) in TOFU's grad_ascent


@pytest.mark.parametrize("gamma, official", [(0.0, 0.075675), (1.0, 0.633907)])
def test_simnpo_matches_its_formula_and_the_official_code(gamma, official):
    # -(2 / beta) logsig(beta (NLL / |y| - gamma)), beta 2.5, NLL / |y| = 0.924196
    losses = simnpo_loss(POLICY, LENGTH, beta=2.5, gamma=gamma)
    close(losses, [0.8 * softplus(-2.5 * (0.924196 - gamma))])
    close(losses, [official])  # Unlearn-Simple repo, TOFU/dataloader.py loss_type "simnpo"


def test_simnpo_needs_no_reference_and_its_margin_raises_the_loss():
    by_gamma = [simnpo_loss(POLICY, LENGTH, beta=2.5, gamma=g).item() for g in (0.0, 0.5, 1.0)]
    assert by_gamma[0] < by_gamma[1] < by_gamma[2]
    # Length-normalised: twice the answer with twice the log-prob is the same loss.
    close(simnpo_loss(2 * POLICY, 2 * LENGTH, beta=2.5, gamma=0.0), [by_gamma[0]])


def test_retain_kl_is_kl_from_the_reference_per_position():
    # Two tokens; position 2 has p(token 0) = 0.25 under the policy, 0.5 under the reference.
    def logits(ps):
        return torch.tensor([[math.log(p), math.log(1 - p)] for p in ps])

    kl = retain_kl(logits([0.5, 0.5, 0.25, 0.5]), logits([0.5] * 4))
    close(kl, [0.0, 0.0, 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), 0.0])
    # NPO-KL's F.kl_div(current, reference, reduction="batchmean", log_target=True) over the same 4 rows
    official = F.kl_div(
        F.log_softmax(logits([0.5, 0.5, 0.25, 0.5]), -1),
        F.log_softmax(logits([0.5] * 4), -1),
        reduction="batchmean",
        log_target=True,
    )
    torch.testing.assert_close(kl.mean(), official)
    close(kl.mean().unsqueeze(0), [0.035960])  # /tmp/refs/ex_unlearn.py
