"""The preference losses against their formulas on hand-computed inputs.

.venv/bin/python -m pytest tests/losses/test_preference.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polmctl.losses.preference import cpo_loss, dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss
from tests.losses.formulas import close, grads, sigmoid, softplus, t

pytestmark = pytest.mark.unit


PC, PR, RC, RR = t(-10, -5), t(-12, -4), t(-11, -5), t(-11, -5)

BETA = 0.5


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_policy_equal_to_reference_gives_ln2_for_dpo_and_the_target_squared_for_ipo(beta):
    logps = t(-3.0, -17.5)
    for loss_type in ("sigmoid", "robust"):
        losses, _ = dpo_loss(logps, logps - 1, logps, logps - 1, beta=beta, loss_type=loss_type, label_smoothing=0.2)
        close(losses, [math.log(2)] * 2)
    losses, _ = dpo_loss(logps, logps - 1, logps, logps - 1, beta=beta, loss_type="ipo")
    close(losses, [(1 / (2 * beta)) ** 2] * 2)


def test_dpo_sigmoid_and_rewards_match_hand_computed_values():
    losses, m = dpo_loss(PC, PR, RC, RR, beta=BETA)
    # beta h = 1 and -0.5
    close(losses, [softplus(-1.0), softplus(0.5)])
    close(m["rewards/chosen"], [0.5 * 1, 0.5 * 0])
    close(m["rewards/rejected"], [0.5 * -1, 0.5 * 1])
    close(m["rewards/margins"], [1.0, -0.5])
    close(m["rewards/accuracies"], [1.0, 0.0])


def test_dpo_label_smoothing_conservative_and_robust():
    e = 0.1
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=e)
    close(losses, [(1 - e) * softplus(-1.0) + e * softplus(1.0), (1 - e) * softplus(0.5) + e * softplus(-0.5)])
    losses, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="robust", label_smoothing=e)
    close(
        losses,
        [
            ((1 - e) * softplus(-1.0) - e * softplus(1.0)) / (1 - 2 * e),
            ((1 - e) * softplus(0.5) - e * softplus(-0.5)) / (1 - 2 * e),
        ],
    )


def test_dpo_without_label_smoothing_all_sigmoid_forms_agree():
    plain, _ = dpo_loss(PC, PR, RC, RR, beta=BETA)
    smoothed, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=0.0)
    robust, _ = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="robust", label_smoothing=0.0)
    torch.testing.assert_close(smoothed, plain, rtol=0, atol=0)
    torch.testing.assert_close(robust, plain, rtol=0, atol=0)


def test_dpo_hinge_is_zero_once_beta_h_reaches_one():
    # h = 2, 1, 3, -1 -> beta h = 1, 0.5, 1.5, -0.5
    pc, rc = t(-10, -10, -10, -5), t(-11, -11, -11, -5)
    pr, rr = t(-12, -11, -13, -4), t(-11, -11, -11, -5)
    losses, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="hinge")
    close(losses, [0.0, 0.5, 0.0, 1.5])


def test_dpo_ipo_matches_hand_computed_values_and_is_zero_at_its_target():
    losses, m = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="ipo", label_smoothing=0.3)  # ignored by ipo
    close(losses, [(2 - 1) ** 2, (-1 - 1) ** 2])  # 1 / (2 beta) = 1
    close(m["rewards/margins"], [1.0, -0.5])
    at_target, _ = dpo_loss(t(4.0), t(-1.0), t(0.0), t(0.0), beta=0.1, loss_type="ipo")  # h = 5 = 1 / (2 beta)
    close(at_target, [0.0])


def test_dpo_rejects_unknown_loss_and_robust_smoothing_of_a_half():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="kto_pair")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="robust", label_smoothing=0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_dpo_gradient_raises_chosen_and_lowers_rejected(loss_type):
    # At policy == reference, h = 0: below the hinge and IPO targets, so all four push h up.
    ref_c, ref_r = t(-10, -7), t(-12, -6)

    def loss(c, r):
        return dpo_loss(c, r, ref_c, ref_r, beta=BETA, loss_type=loss_type, label_smoothing=0.1)

    d_chosen, d_rejected = grads(loss, ref_c, ref_r)
    assert (d_chosen < 0).all() and (d_rejected > 0).all()


def test_simpo_matches_hand_computed_values_and_rewards_are_beta_avg():
    losses, m = simpo_loss(t(-1.0, -2.0), t(-1.5, -1.0), beta=2.0, gamma=0.5)
    # 2 * 0.5 - 0.5 = 0.5 and 2 * -1 - 0.5 = -2.5
    close(losses, [softplus(-0.5), softplus(2.5)])
    close(m["rewards/chosen"], [-2.0, -4.0])
    close(m["rewards/rejected"], [-3.0, -2.0])
    close(m["rewards/accuracies"], [1.0, 0.0])


def test_simpo_margin_raises_the_loss_of_a_fixed_pair():
    chosen, rejected = t(-1.0), t(-1.5)
    by_gamma = [simpo_loss(chosen, rejected, beta=2.0, gamma=g)[0].item() for g in (0.0, 0.5, 1.0)]
    assert by_gamma[0] < by_gamma[1] < by_gamma[2]
    assert by_gamma[0] == pytest.approx(softplus(-1.0))


def test_cpo_matches_hand_computed_values():
    losses, m = cpo_loss(t(-20.0, -30.0), t(-30.0, -25.0), beta=0.1)
    close(losses, [softplus(-1.0), softplus(0.5)])
    close(m["rewards/chosen"], [-2.0, -3.0])
    close(m["rewards/margins"], [1.0, -0.5])


def test_orpo_matches_hand_computed_values():
    # p_c = 0.5 -> odds 1, log odds 0; p_r = 0.2 -> odds 0.25; log odds ratio = log 4
    losses, m = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1)
    close(losses, [0.1 * math.log(1.25)])  # -logsig(log 4) = log(1 + 1/4)
    close(m["log_odds_ratio"], [math.log(4)])
    close(m["log_odds_chosen"], [0.0])
    close(m["rewards/chosen"], [0.1 * math.log(0.5)])


def test_orpo_log_odds_stay_accurate_near_zero():
    # log odds of p = exp(-1e-5): x - log(1 - e^x), computed in float64 here. In float32,
    # log1p(-exp(x)) is off by ~5e-4 relative at this x.
    x = -1e-5
    _, m = orpo_loss(t(x), t(math.log(0.5)), beta=0.1)
    torch.testing.assert_close(m["log_odds_chosen"], t(x - math.log(-math.expm1(x))), rtol=1e-5, atol=0)


def test_orpo_is_finite_with_finite_gradients_when_avg_logp_is_zero_or_nearly():
    chosen = t(0.0, -1e-9, -1e-6, -50.0).requires_grad_()
    rejected = t(-1e-7, 0.0, -2.0, -60.0).requires_grad_()
    losses, m = orpo_loss(chosen, rejected, beta=0.1)
    losses.sum().backward()
    for value in (losses, m["log_odds_ratio"], chosen.grad, rejected.grad):
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_reference_free_gradients_raise_chosen_and_lower_rejected(name):
    loss = {
        "simpo": lambda c, r: simpo_loss(c, r, beta=2.0, gamma=0.5),
        "cpo": lambda c, r: cpo_loss(c, r, beta=0.1),
        "orpo": lambda c, r: orpo_loss(c, r, beta=0.1),
    }[name]
    d_chosen, d_rejected = grads(loss, t(-1.2, -0.3), t(-0.8, -2.0))
    assert (d_chosen < 0).all() and (d_rejected > 0).all()


def test_kto_matches_hand_computed_values():
    # r = 1 (desirable) and -1 (undesirable), kl = 0.2
    losses, m = kto_loss(
        t(-3, -4),
        t(-4, -3),
        torch.tensor([True, False]),
        torch.tensor(0.2),
        beta=0.5,
        desirable_weight=1.5,
        undesirable_weight=0.5,
    )
    close(losses, [1.5 * (1 - sigmoid(0.5 * 0.8)), 0.5 * (1 - sigmoid(0.5 * 1.2))])
    close(m["rewards/chosen"], [0.5, 0.0])
    close(m["rewards/rejected"], [0.0, -0.5])
    close(m["desirable"], [1.0, 0.0])
    close(m["kl"], [0.2, 0.2])


def test_kto_all_desirable_ignores_undesirable_weight_and_falls_as_r_rises():
    policy, ref, labels, kl = t(-5, -4, -3, -2), t(-4, -4, -4, -4), torch.ones(4, dtype=torch.bool), torch.tensor(0.1)
    losses, _ = kto_loss(policy, ref, labels, kl, beta=0.5, undesirable_weight=1.0)
    other, _ = kto_loss(policy, ref, labels, kl, beta=0.5, undesirable_weight=7.0)
    torch.testing.assert_close(other, losses, rtol=0, atol=0)
    assert (losses[1:] < losses[:-1]).all()  # r = -1, 0, 1, 2


def test_kto_kl_estimate_is_the_mean_clamped_at_zero_and_detached():
    policy = t(-3.0, -5.0).requires_grad_()
    kl = kto_kl_estimate(policy, t(-4.0, -5.5))  # mean(1, 0.5)
    torch.testing.assert_close(kl, torch.tensor(0.75))
    assert not kl.requires_grad
    assert kto_kl_estimate(policy, t(-1.0, -2.0)).item() == 0.0  # mean(-2, -3) < 0


# -- more pairwise losses (TRL 1.16 DPOTrainer._compute_loss's loss_type values) ----------------
# chosen -10 (reference -12): h_w = 2; rejected -15 (reference -13): h_l = -2; beta 0.1, so r_w = 0.2, r_l = -0.2.
MORE = {"policy_chosen": t(-10.0), "policy_rejected": t(-15.0), "ref_chosen": t(-12.0), "ref_rejected": t(-13.0)}


@pytest.mark.parametrize(
    "loss_type, smoothing, by_formula, by_hand",
    [
        # BCO without its running shift: -logsig(r_w) - logsig(-r_l)
        ("bco_pair", 0.0, 2 * softplus(-0.2), 1.196278),
        # APO-zero (eq. 7): 1 - sig(r_w) + sig(r_l)
        ("apo_zero", 0.0, 1 - sigmoid(0.2) + sigmoid(-0.2), 0.900332),
        # APO-down (eq. 8): sig(r_w) + 1 - sig(r_w - r_l)
        ("apo_down", 0.0, sigmoid(0.2) + 1 - sigmoid(0.4), 0.951146),
        # EXO-pref (eq. 16), epsilon 1e-3: q log(q / (1 - e)) + (1 - q) log((1 - q) / e), q = sig(beta h) = sig(0.4)
        (
            "exo_pair",
            1e-3,
            sigmoid(0.4) * math.log(sigmoid(0.4) / 0.999) + sigmoid(-0.4) * math.log(sigmoid(-0.4) / 1e-3),
            2.099226,
        ),
        # NCA: -logsig(r_w) - logsig(-r_w) / 2 - logsig(-r_l) / 2
        ("nca_pair", 0.0, softplus(-0.2) + softplus(0.2) / 2 + softplus(-0.2) / 2, 1.296278),
        # SPPO hard (eq. 4.7, P = 1 for the winner, 0 for the loser): (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2
        ("sppo_hard", 0.0, (2 - 5) ** 2 + (-2 + 5) ** 2, 18.0),
    ],
)
def test_more_pairwise_losses_match_their_papers_formulas(loss_type, smoothing, by_formula, by_hand):
    losses, m = dpo_loss(**MORE, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    close(losses, [by_formula])
    close(losses, [by_hand])  # the worked values of the reference notes (/tmp/refs/ex_dpo.py)
    close(m["rewards/chosen"], [0.2])
    close(m["rewards/rejected"], [-0.2])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_more_pairwise_losses_at_policy_equal_to_reference(beta):
    logps = t(-3.0, -17.5)
    expected = {
        "bco_pair": 2 * math.log(2),
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "exo_pair": 0.5 * math.log(0.5 / (1 - 1e-3)) + 0.5 * math.log(0.5 / 1e-3),
        "nca_pair": 2 * math.log(2),
        "sppo_hard": 2 / (2 * beta) ** 2,
    }
    for loss_type, value in expected.items():
        losses, _ = dpo_loss(logps, logps - 1, logps, logps - 1, beta=beta, loss_type=loss_type, label_smoothing=1e-3)
        close(losses, [value] * 2)


def test_more_pairwise_losses_match_trls_compute_loss():
    torch.manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(6) * 20 for _ in range(4))
    beta, eps = 0.3, 0.01
    # trl/trainer/dpo_trainer.py (1.16) DPOTrainer._compute_loss, f_divergence_type="reverse_kl":
    cl, rl = pc - rc, pr - rr  # chosen_logratios, rejected_logratios
    delta = cl - rl  # delta_score
    epsilon = torch.tensor(eps)
    trl = {
        "bco_pair": -F.logsigmoid(beta * cl) - F.logsigmoid(-(beta * rl)),
        "apo_zero": (1 - torch.sigmoid(beta * cl)) + torch.sigmoid(beta * rl),
        "apo_down": torch.sigmoid(beta * cl) + (1 - torch.sigmoid(beta * (cl - rl))),
        "exo_pair": torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-epsilon))
        + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon)),
        "nca_pair": -F.logsigmoid(beta * cl) - 0.5 * F.logsigmoid(-(beta * cl)) - 0.5 * F.logsigmoid(-(beta * rl)),
        "sppo_hard": (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2,
    }
    for loss_type, expected in trl.items():
        ours, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
        torch.testing.assert_close(ours, expected, msg=loss_type)


@pytest.mark.parametrize("loss_type", ["bco_pair", "apo_zero", "exo_pair", "nca_pair", "sppo_hard", "apo_down"])
def test_more_pairwise_losses_lower_the_rejected_answer_from_the_start(loss_type):
    ref_c, ref_r = t(-10, -7), t(-12, -6)

    def loss(c, r):
        return dpo_loss(c, r, ref_c, ref_r, beta=BETA, loss_type=loss_type, label_smoothing=1e-3)

    d_chosen, d_rejected = grads(loss, ref_c, ref_r)
    assert (d_rejected > 0).all()
    if loss_type == "apo_down":  # APO-down lowers both answers, the rejected more: flat in chosen at the start
        close(d_chosen, [0.0, 0.0])
    else:
        assert (d_chosen < 0).all()


def test_exo_pair_needs_a_positive_epsilon():
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type="exo_pair")
