"""The online-RL losses against values worked out by hand on small tensors.

.venv/bin/python -m pytest tests/losses/test_policy_gradient.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.losses.policy_gradient import (
    batch_whiten,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    informative_groups,
    k1_kl,
    k3_kl,
    kl_shaped_returns,
    policy_loss_weight,
    whiten,
    zero_variance_fraction,
)

pytestmark = pytest.mark.unit


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor | float, expected) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32)
    )


def mean_of(pair: tuple[torch.Tensor, torch.Tensor]) -> float:
    total, count = pair
    return float(total) / float(count)


# -- group advantages ----------------------------------------------------------------------


def test_grpo_advantages_for_groups_of_two():
    # Groups [1, 0] and [0, 1]: mean 0.5, deviations +-0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5).
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # = 0.70700...
    close(group_advantages(t(1, 0, 0, 1), 2), [a, -a, -a, a])


def test_grpo_advantages_for_one_group_of_four_use_the_unbiased_std_as_trl():
    # [1, 0, 0, 1]: mean 0.5, unbiased var (4 * 0.25) / 3 = 1/3, std 0.57735 -> +-0.86588.
    # (The biased std would be 0.5 and give +-1.)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(group_advantages(t(1, 0, 0, 1), 4), [a, -a, -a, a])
    close(a, 0.86588)


def test_dr_grpo_advantages_are_not_scaled():
    close(group_advantages(t(1, 0, 0, 1), 2, scale="none"), [0.5, -0.5, -0.5, 0.5])
    close(group_advantages(t(3, 1, 2, 0), 4, scale="none"), [1.5, -0.5, 0.5, -1.5])  # mean 1.5


def test_rloo_subtracts_the_mean_of_the_other_completions():
    # [3, 1, 2]: 3 - (1 + 2)/2 = 1.5;  1 - (3 + 2)/2 = -1.5;  2 - (3 + 1)/2 = 0.
    close(group_advantages(t(3, 1, 2), 3, scale="none", baseline="leave_one_out"), [1.5, -1.5, 0.0])
    # [1, 0]: 1 - 0 = 1, 0 - 1 = -1 (twice GRPO's +-0.5: G / (G - 1) = 2).
    close(group_advantages(t(1, 0), 2, scale="none", baseline="leave_one_out"), [1.0, -1.0])
    # with scale=std, divided by the group std sqrt(0.5) + 1e-4.
    a = 1 / (math.sqrt(0.5) + 1e-4)
    close(group_advantages(t(1, 0), 2, baseline="leave_one_out"), [a, -a])


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
def test_a_group_of_equal_rewards_gets_zero_advantage_not_nan(baseline):
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    b = a if baseline == "mean" else 2 * a
    rewards = t(1, 1, 0, 1, 0.5, 0.5)
    advantages = group_advantages(rewards, 2, baseline=baseline)
    assert torch.isfinite(advantages).all()
    close(advantages, [0, 0, -b, b, 0, 0])


def test_zero_variance_groups_are_counted_and_masked_out():
    rewards = t(1, 1, 0, 1, 0.5, 0.5)  # groups [1, 1] and [0.5, 0.5] carry no signal
    assert zero_variance_fraction(rewards, 2) == pytest.approx(2 / 3)
    assert informative_groups(rewards, 2).tolist() == [False, False, True, True, False, False]
    assert zero_variance_fraction(t(0, 1, 1, 0), 2) == 0.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: group_advantages(t(1, 0, 1, 0, 1), 2), "do not split into groups of 2"),
        (lambda: group_advantages(t(1, 0), 1, baseline="leave_one_out"), "at least 2"),
        (lambda: group_advantages(t(1, 0), 1), "at least 2"),
        (lambda: group_advantages(t(1, 0), 2, baseline="median"), "unknown baseline"),
        (lambda: group_advantages(t(1, 0), 2, scale="max"), "unknown scale"),
        (lambda: zero_variance_fraction(t(1, 0, 1), 2), "do not split"),
    ],
)
def test_bad_group_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- k3 ------------------------------------------------------------------------------------


def test_k3_is_zero_where_policy_equals_reference_and_positive_elsewhere():
    logps = torch.tensor([[-0.3, -2.0, -7.5]])
    close(k3_kl(logps, logps), torch.zeros(1, 3))
    # logp -1, ref -2: d = ref - logp = -1, e^-1 + 1 - 1 = 0.36788.
    # logp -2, ref -1: d = 1, e - 1 - 1 = 0.71828.
    close(k3_kl(t(-1, -2), t(-2, -1)), [0.36788, 0.71828])


# -- clipped policy loss -------------------------------------------------------------------


def test_ratio_clipping_on_both_sides():
    # Four rows of one token: (ratio, A) = (1.5, 2), (1.5, -2), (0.5, -2), (0.5, 2); eps 0.2.
    # (1.5,  2): -min(3, 1.2 * 2)       = -2.4 = -1.2 A   clipped high, no gradient
    # (1.5, -2): -min(-3, 1.2 * -2)     =  3   = -1.5 A   not clipped: gradient -A rho = 3
    # (0.5, -2): -min(-1, 0.8 * -2)     =  1.6 = -0.8 A   clipped low, no gradient
    # (0.5,  2): -min(1, 0.8 * 2)       = -1   = -0.5 A   not clipped: gradient -A rho = -1
    logps = torch.log(t(1.5, 1.5, 0.5, 0.5)).unsqueeze(1).requires_grad_()
    old, advantages, mask = torch.zeros(4, 1), t(2, -2, -2, 2), torch.ones(4, 1)
    loss_sum, weight, metrics = clipped_policy_loss(
        logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo"
    )
    close(loss_sum, -2.4 + 3 + 1.6 - 1)
    assert weight == 4
    loss_sum.backward()
    close(logps.grad, [[0.0], [3.0], [0.0], [-1.0]])
    assert mean_of(metrics["clip_ratio/high"]) == pytest.approx(1 / 4)
    assert mean_of(metrics["clip_ratio/low"]) == pytest.approx(1 / 4)
    assert mean_of(metrics["clip_ratio/region"]) == pytest.approx(2 / 4)
    assert mean_of(metrics["ratio"]) == pytest.approx((1.5 + 1.5 + 0.5 + 0.5) / 4)
    assert "kl" not in metrics


def test_asymmetric_clip_uses_epsilon_high_above_and_epsilon_low_below():
    logps = torch.log(t(1.25, 0.75)).unsqueeze(1)
    # eps_high 0.28 (DAPO's clip-higher) leaves 1.25 inside: -1.25 * 1; eps_low 0.2 clips 0.75 to 0.8: -0.8 * -1.
    loss_sum, _, metrics = clipped_policy_loss(
        logps, torch.zeros(2, 1), t(1, -1), torch.ones(2, 1), epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo"
    )
    close(loss_sum, -1.25 + 0.8)
    assert mean_of(metrics["clip_ratio/high"]) == 0.0
    assert mean_of(metrics["clip_ratio/low"]) == pytest.approx(1 / 2)


# Two completions, 3 and 1 tokens, on-policy (ratio 1), A = 1 and -2, so every real token's
# loss is -A: row 0 tokens -1, -1, -1; row 1 token +2. The padded tokens hold garbage.
UNEQUAL_LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 5.0, 9.0]])
UNEQUAL_OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]])
UNEQUAL_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
UNEQUAL_A = t(1, -2)


@pytest.mark.parametrize(
    "loss_type, loss_sum, weight, loss",
    [
        # grpo: row means -1 and 2, then their mean: 0.5.
        ("grpo", -1 + 2, 2, 0.5),
        # dapo (and bnpo): token sum -3 + 2 = -1 over 4 tokens: -0.25.
        ("dapo", -1, 4, -0.25),
        ("bnpo", -1, 4, -0.25),
        # dr_grpo, L = 4: token sum -1 / (B L = 8) = -0.125.
        ("dr_grpo", -1 / 4, 2, -0.125),
    ],
)
def test_each_loss_type_normalises_unequal_lengths_its_own_way(loss_type, loss_sum, weight, loss):
    got_sum, got_weight, _ = clipped_policy_loss(
        UNEQUAL_LOGPS,
        UNEQUAL_OLD,
        UNEQUAL_A,
        UNEQUAL_MASK,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type=loss_type,
        max_completion_length=4,
    )
    close(got_sum, loss_sum)
    assert got_weight == weight == policy_loss_weight(UNEQUAL_MASK, loss_type)
    close(got_sum / got_weight, loss)


def test_the_kl_penalty_adds_beta_k3_per_token():
    # A = 0 and ratio 1, so the loss is beta k3 alone; k3(logp -1, ref -2) = e^-1 = 0.36788.
    logps = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0]])  # the second token: k3 = 0
    loss_sum, weight, metrics = clipped_policy_loss(
        logps,
        logps,
        t(0),
        torch.ones(1, 2),
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="dapo",
        ref_logps=ref,
        beta=0.1,
    )
    close(loss_sum / weight, 0.1 * math.exp(-1) / 2)
    assert mean_of(metrics["kl"]) == pytest.approx(math.exp(-1) / 2)


def test_on_policy_ratio_carries_the_gradient_of_logp():
    # old = logp.detach(): ratio 1, d(-ratio A)/dlogp = -A.
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss_sum, _, _ = clipped_policy_loss(
        logps, logps.detach(), t(3), torch.ones(1, 2), epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo"
    )
    loss_sum.backward()
    close(logps.grad, [[-3.0, -3.0]])


def test_padding_filled_with_inf_leaves_the_loss_and_gradient_finite():
    # Row 1's padded old and reference log-probs are -inf: exp(logp - old) there would be inf.
    logps = UNEQUAL_LOGPS.clone().requires_grad_()
    old = UNEQUAL_OLD.masked_fill(UNEQUAL_MASK == 0, -math.inf)
    loss_sum, weight, _ = clipped_policy_loss(
        logps,
        old,
        UNEQUAL_A,
        UNEQUAL_MASK,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="dapo",
        ref_logps=old,
        beta=0.1,
    )
    loss_sum.backward()
    # The real tokens: ratio 1 and ref = old = logp, so k3 = 0 and the loss is -0.25 as without padding.
    close(loss_sum / weight, -0.25)
    assert torch.isfinite(logps.grad).all()
    close(logps.grad[1, 1:], [0.0, 0.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "token_mean"}, "unknown loss_type"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
        ({"loss_type": "dapo", "beta": 0.1}, "ref_logps"),
    ],
)
def test_bad_policy_loss_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        clipped_policy_loss(
            UNEQUAL_LOGPS, UNEQUAL_OLD, UNEQUAL_A, UNEQUAL_MASK, epsilon_low=0.2, epsilon_high=0.2, **kwargs
        )


# Four on-policy completions of 3, 1, 2, 1 tokens with A = 1, -2, 0.5, 3: token losses -A.
# Row sums -3, 2, -1, -3 (total -5, 7 tokens); row means -1, 2, -0.5, -3.
BATCH_LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0], [-0.1, -0.2, 0.0], [-4.0, 0.0, 0.0]])
BATCH_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
BATCH_A = t(1, -2, 0.5, 3)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("grpo", (-1 + 2 - 0.5 - 3) / 4),  # -0.625
        ("dapo", -5 / 7),
        ("dr_grpo", -5 / (4 * 4)),  # L = 4: -0.3125
    ],
)
def test_micro_batches_sum_to_the_whole_batch(loss_type, expected):
    def terms(rows, width):
        logps = BATCH_LOGPS[rows, :width]
        return clipped_policy_loss(
            logps,
            logps,
            BATCH_A[rows],
            BATCH_MASK[rows, :width],
            epsilon_low=0.2,
            epsilon_high=0.2,
            loss_type=loss_type,
            max_completion_length=4,
        )

    whole_sum, whole_weight, whole_metrics = terms([0, 1, 2, 3], 3)
    close(whole_sum / whole_weight, expected)
    # The second half is padded only to its own longest row (2): the width must not matter.
    (sum_1, weight_1, metrics_1), (sum_2, weight_2, metrics_2) = terms([0, 1], 3), terms([2, 3], 2)
    close((sum_1 + sum_2) / (weight_1 + weight_2), expected)
    for name, (total, count) in whole_metrics.items():
        close(metrics_1[name][0] + metrics_2[name][0], total)
        close(metrics_1[name][1] + metrics_2[name][1], count)


# -- GAE, whitening, value loss ------------------------------------------------------------

REWARDS = torch.tensor([[0.0, 0.0, 1.0]])
VALUES = torch.tensor([[0.5, 0.6, 0.7]])


def test_gae_with_gamma_1_and_lambda_0_95():
    # delta_2 = 1 - 0.7 = 0.3 (no value after the end); delta_1 = 0.7 - 0.6 = 0.1; delta_0 = 0.6 - 0.5 = 0.1.
    # A_2 = 0.3;  A_1 = 0.1 + 0.95 * 0.3 = 0.385;  A_0 = 0.1 + 0.95 * 0.385 = 0.46575.
    advantages, returns = gae(REWARDS, VALUES, torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(advantages, [[0.46575, 0.385, 0.3]])
    close(returns, [[0.96575, 0.985, 1.0]])  # A + V


def test_gae_with_gamma_0_9_and_lambda_1_is_the_discounted_return_minus_the_value():
    # delta_2 = 0.3; delta_1 = 0.9 * 0.7 - 0.6 = 0.03; delta_0 = 0.9 * 0.6 - 0.5 = 0.04.
    # A_2 = 0.3;  A_1 = 0.03 + 0.9 * 0.3 = 0.3;  A_0 = 0.04 + 0.9 * 0.3 = 0.31.
    # Returns are the discounted rewards-to-go: 0.81, 0.9, 1.
    advantages, returns = gae(REWARDS, VALUES, torch.ones(1, 3), gamma=0.9, lam=1.0)
    close(advantages, [[0.31, 0.3, 0.3]])
    close(returns, [[0.81, 0.9, 1.0]])


def test_gae_ignores_padded_tokens():
    # Row 1 ends after 2 tokens; its padded reward 5 and value 9 are garbage.
    # delta_1 = 1 + 0 - 0.6 = 0.4 (value after the end is 0); delta_0 = 0.6 - 0.5 = 0.1.
    # A_1 = 0.4;  A_0 = 0.1 + 0.95 * 0.4 = 0.48;  padded A and R are 0.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    close(advantages, [[0.46575, 0.385, 0.3], [0.48, 0.4, 0.0]])
    close(returns, [[0.96575, 0.985, 1.0], [0.98, 1.0, 0.0]])
    alone, _ = gae(rewards[1:, :2], values[1:, :2], torch.ones(1, 2), gamma=1.0, lam=0.95)
    close(advantages[1:, :2], alone)


def test_whiten_over_the_masked_entries():
    # [2, 4, 6] (99 is padding): mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2.
    x, mask = torch.tensor([[2.0, 4.0, 6.0, 99.0]]), torch.tensor([[1, 1, 1, 0]])
    close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])  # mean 4 added back
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.tensor([[1, 0, 0, 0]]))


def test_clipped_value_loss():
    # clip_range 0.2; rows [t0, t1] and [t2, pad].
    # t0: V 1.0, V_old 0.5 -> clipped 0.7; R 2: (1 - 2)^2 = 1 < (0.7 - 2)^2 = 1.69 -> 0.5 * 1.69 = 0.845, clipped
    # t1: V 1.0, V_old 0.5 -> clipped 0.7; R 0: 1 > 0.49 -> 0.5 * 1 = 0.5
    # t2: V 0.6, V_old 0.5 -> inside the range; R 3: 2.4^2 = 5.76 both -> 2.88, not counted
    values = torch.tensor([[1.0, 1.0], [0.6, 100.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5], [0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0], [3.0, -100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss_sum, weight, metrics = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    close(loss_sum, 0.845 + 0.5 + 2.88)
    assert weight == 3
    assert mean_of(metrics["value/clip_ratio"]) == pytest.approx(1 / 3)
    loss_sum.backward()
    # t0 takes the clipped branch (no gradient); t1: V - R = 1; t2: 0.6 - 3 = -2.4; pad: 0.
    close(values.grad, [[0.0, 1.0], [-2.4, 0.0]])


@pytest.mark.parametrize("size,value", [(3, 0.9), (8, 0.1), (7, 0.7), (3, 1.1)])
def test_equal_rewards_rounded_away_from_their_mean_still_get_exactly_zero(size, value):
    # float32's mean of eight 0.1s is not 0.1; dividing the residue by the zero std + eps made it ~7e-5.
    rewards = torch.full((size,), value, dtype=torch.float32)
    for baseline in ("mean", "leave_one_out"):
        assert group_advantages(rewards, size, baseline=baseline).tolist() == [0.0] * size


def test_the_sequence_level_ratio_is_one_ratio_per_completion_as_rloo():
    """RLOO (Ahmadian et al., 2024; TRL's RLOOTrainer): rho_i = exp(sum_t logp - sum_t old), one clipped
    term per completion, the mean over completions."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    old = logps.detach() + torch.tensor([[0.1, 0.0, 9.0], [0.0, 0.0, 0.0]])  # row 0's padding differs: ignored
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0])
    loss_sum, weight, metrics = clipped_policy_loss(
        logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo", importance_level="sequence"
    )
    rho = math.exp(-0.1)  # row 0: one token's log-ratio of -0.1; row 1: ratio 1
    assert weight == 2  # completions, whatever loss_type says
    torch.testing.assert_close(loss_sum, torch.tensor(-rho + 1.0), rtol=1e-6, atol=1e-6)
    loss_sum.backward()  # d/dlogp_t of -rho A = -rho A on every real token of the row, 0 on padding
    torch.testing.assert_close(logps.grad, torch.tensor([[-rho, -rho, 0.0], [1.0, 1.0, 1.0]]))
    # Clipped as a whole: a completion whose likelihood rose by e^0.5 gets no gradient for A > 0.
    far = clipped_policy_loss(
        logps.detach().requires_grad_(),
        old - 0.5,
        torch.tensor([1.0, 1.0]),
        mask,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="grpo",
        importance_level="sequence",
    )
    assert far[2]["clip_ratio/high"][0].item() == 5  # all five real tokens sit in clipped completions


def test_the_sequence_level_loss_matches_trls_rloo_formula():
    torch.manual_seed(0)
    logps, old = -torch.rand(4, 6), -torch.rand(4, 6)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:], mask[3, 2:] = 0, 0
    advantages = torch.randn(4)
    ours, weight, _ = clipped_policy_loss(
        logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", importance_level="sequence"
    )
    # trl/trainer/rloo_trainer.py (1.16): logps = (per_token_logps * completion_mask).sum(1), likewise old_logps;
    # coef_1 = exp(logps - old_logps); loss = mean(-min(coef_1 A, clamp(coef_1, 1 - eps_low, 1 + eps_high) A)).
    coef = torch.exp((logps * mask).sum(1) - (old * mask).sum(1))
    trl = (-torch.min(coef * advantages, coef.clamp(0.8, 1.28) * advantages)).mean()
    torch.testing.assert_close(ours / weight, trl)


# -- GSPO, CISPO, REINFORCE++ --------------------------------------------------------------
# Two completions of 3 and 2 tokens (row 1's third position is padding holding 0.9); old policy
# 0.5 on every token; A = +1, -1. Token ratios [[1.5, 1, 0.5], [0.5, 1]].
AFTER_GRPO_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
AFTER_GRPO_OLD = torch.log(torch.full((2, 3), 0.5))
AFTER_GRPO_A = t(1, -1)


def after_grpo_logps() -> torch.Tensor:
    return torch.log(torch.tensor([[0.75, 0.5, 0.25], [0.25, 0.5, 0.9]])).requires_grad_()


def test_gspo_ratio_is_the_length_normalised_sequence_ratio():
    """GSPO (Zheng et al., 2025): s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|), mean_i -min(s_i A_i, clip(s_i) A_i)."""
    s1, s2 = 0.75 ** (1 / 3), 0.5 ** (1 / 2)  # 0.908560 (inside [0.8, 1.2]) and 0.707107 (below 0.8, A < 0: clipped)
    logps = after_grpo_logps()
    loss_sum, weight, metrics = clipped_policy_loss(
        logps,
        AFTER_GRPO_OLD,
        AFTER_GRPO_A,
        AFTER_GRPO_MASK,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="dapo",  # not used: one loss per completion
        importance_level="sequence_mean",
    )
    assert weight == 2 == policy_loss_weight(AFTER_GRPO_MASK, "dapo", "sequence_mean")
    close(loss_sum / weight, (-s1 + 0.8) / 2)  # -0.054280
    (loss_sum / weight).backward()
    # d/dlogp_t of -s1 A / 2 = -s1 / (3 * 2) on each of row 0's tokens; row 1 sits in the clip: no gradient.
    close(logps.grad, [[-s1 / 6] * 3, [0.0, 0.0, 0.0]])
    close(-s1 / 6, -0.151427)
    assert mean_of(metrics["clip_ratio/low"]) == pytest.approx(2 / 5)  # row 1's two tokens
    assert mean_of(metrics["ratio"]) == pytest.approx((3 * s1 + 2 * s2) / 5)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_matches_trls_sequence_importance_sampling(beta):
    torch.manual_seed(1)
    logps, old, ref = -torch.rand(4, 6), -torch.rand(4, 6), -torch.rand(4, 6)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:], mask[3, 2:] = 0, 0
    advantages = torch.randn(4)
    ours, weight, _ = clipped_policy_loss(
        logps,
        old,
        advantages,
        mask,
        epsilon_low=3e-2,
        epsilon_high=4e-2,
        loss_type="grpo",
        importance_level="sequence_mean",
        ref_logps=ref,
        beta=beta,
    )
    # trl/trainer/grpo_trainer.py (1.16) _compute_loss, importance_sampling_level="sequence", loss_type="grpo",
    # use_bias_correction_kl=False: log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1),
    # per_token_loss = -min(coef_1 A, clamp(coef_1, 1 - eps_low, 1 + eps_high) A) + beta k3,
    # loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean().
    m = mask.float()
    coef_1 = torch.exp(((logps - old) * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_1.clamp(1 - 3e-2, 1 + 4e-2) * a)
    per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1)
    trl = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    torch.testing.assert_close(ours / weight, trl)


def test_cispo_weights_every_tokens_log_prob_by_its_capped_ratio():
    """CISPO (MiniMax-M1): l_t = -sg(min(rho_t, 1 + eps_high)) A log pi_t, summed over tokens / tokens."""
    logps = after_grpo_logps()
    loss_sum, weight, _ = clipped_policy_loss(
        logps, AFTER_GRPO_OLD, AFTER_GRPO_A, AFTER_GRPO_MASK, epsilon_low=0.2, epsilon_high=4.0, loss_type="cispo"
    )
    assert weight == 5  # tokens
    # -(1/5) [1.5 ln 0.75 + ln 0.5 + 0.5 ln 0.25 - 0.5 ln 0.25 - ln 0.5] = -(1.5 ln 0.75) / 5
    close(loss_sum / weight, -1.5 * math.log(0.75) / 5)
    close(loss_sum / weight, 0.086305)
    (loss_sum / weight).backward()
    # -w A / 5 on every real token, even those a PPO clip would drop (ratio 1.5 with A > 0)
    close(logps.grad, [[-0.3, -0.2, -0.1], [0.1, 0.2, 0.0]])


def test_cispo_caps_the_weight_at_one_plus_epsilon_high_and_still_passes_the_gradient():
    logps = torch.log(t(3.0, 1.5)).unsqueeze(1).requires_grad_()  # ratios 3 and 1.5 (old = 0)
    loss_sum, _, metrics = clipped_policy_loss(
        logps, torch.zeros(2, 1), t(2, -1), torch.ones(2, 1), epsilon_low=0.2, epsilon_high=0.2, loss_type="cispo"
    )
    loss_sum.backward()
    close(logps.grad, [[-1.2 * 2], [1.2 * 1]])  # both capped at 1.2, neither dropped
    assert mean_of(metrics["clip_ratio/high"]) == pytest.approx(1 / 2)  # capped with A > 0 (TRL's cispo_clip_ratio)
    assert mean_of(metrics["clip_ratio/low"]) == 0.0


def test_cispo_matches_trls_loss_type_cispo():
    torch.manual_seed(2)
    logps = (-torch.rand(4, 6) * 3).requires_grad_()
    old = logps.detach() + 0.5 * torch.randn(4, 6)  # ratios from ~0.2 to ~5: some past the cap
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 3:], mask[2, 5:] = 0, 0
    advantages = torch.randn(4)
    ours, weight, _ = clipped_policy_loss(
        logps, old, advantages, mask, epsilon_low=0.2, epsilon_high=1.5, loss_type="cispo"
    )
    # trl/trainer/grpo_trainer.py (1.16) _compute_loss, loss_type="cispo", epsilon_high=2.5 (its cap, ours 1 + 1.5):
    # clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach(); per_token_loss = -clamped_ratios * A * logp;
    # loss = (per_token_loss * mask).sum() / num_items_in_batch (the completion tokens; one process, one step).
    coef_1 = torch.exp(logps.detach() - old)
    trl_per_token = -coef_1.clamp(max=2.5) * advantages.unsqueeze(1) * logps
    trl = (trl_per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(ours / weight, trl)
    (ours_grad,) = torch.autograd.grad(ours / weight, logps)
    (trl_grad,) = torch.autograd.grad(trl, logps)
    torch.testing.assert_close(ours_grad, trl_grad)


def test_cispo_refuses_a_sequence_ratio():
    with pytest.raises(ValueError, match="importance_level must be 'token'"):
        policy_loss_weight(AFTER_GRPO_MASK, "cispo", "sequence_mean")


def test_no_baseline_keeps_the_rewards_and_refuses_std_scaling():
    close(group_advantages(t(1, 1, 0, 0.5), 2, scale="none", baseline="none"), [1, 1, 0, 0.5])  # equal group kept
    with pytest.raises(ValueError, match="needs a baseline"):
        group_advantages(t(1, 0), 2, baseline="none")


# OpenRLHF's REINFORCE++ on one example (/tmp/refs/ex_reinforce.py, commit 3c3be62's code): rollout
# policy 0.5 on every token, reference [[0.25, 0.5, 1], [0.5, 1, pad]], rewards 1 and 0, kl coef 0.1.
REINFORCE_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
REINFORCE_OLD = torch.log(torch.full((2, 3), 0.5))
REINFORCE_REF = torch.log(torch.tensor([[0.25, 0.5, 1.0], [0.5, 1.0, 0.5]]))


def test_k1_is_the_log_ratio_clamped_and_zero_on_padding():
    ln2 = math.log(2)
    close(k1_kl(REINFORCE_OLD, REINFORCE_REF, REINFORCE_MASK), [[ln2, 0.0, -ln2], [0.0, -ln2, 0.0]])
    inf_pad = torch.tensor([[-1.0, -math.inf]])
    close(k1_kl(inf_pad, torch.tensor([[-13.0, -math.inf]]), torch.tensor([[1, 0]])), [[10.0, 0.0]])  # 12 -> 10


def test_reinforce_pp_returns_fold_the_future_kl_into_the_reward():
    kl = k1_kl(REINFORCE_OLD, REINFORCE_REF, REINFORCE_MASK)
    returns = kl_shaped_returns(t(1, 0), kl, REINFORCE_MASK, coef=0.1)
    # Row 0: per-token rewards [-0.1 ln2, 0, 0.1 ln2 + 1]; returns to go: [1, 1 + 0.1 ln2, 1 + 0.1 ln2].
    # Row 1: [0, 0.1 ln2]; returns [0.1 ln2, 0.1 ln2]; padding 0.
    d = 0.1 * math.log(2)
    close(returns, [[1.0, 1 + d, 1 + d], [d, d, 0.0]])
    close(returns, [[1.0, 1.069315, 1.069315], [0.069315, 0.069315, 0.0]])  # OpenRLHF's numbers


def test_batch_whitening_uses_one_population_mean_and_variance_over_all_tokens():
    kl = k1_kl(REINFORCE_OLD, REINFORCE_REF, REINFORCE_MASK)
    returns = kl_shaped_returns(t(1, 0), kl, REINFORCE_MASK, coef=0.1)
    (whitened,) = batch_whiten([returns], [REINFORCE_MASK])
    d = 0.1 * math.log(2)
    tokens = [1.0, 1 + d, 1 + d, d, d]
    mean = sum(tokens) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / 5)  # population variance, as OpenRLHF
    close(whitened, [[(x - mean) / std for x in tokens[:3]], [(tokens[3] - mean) / std] * 2 + [0.0]])
    close(whitened[:, :2], [[0.718936, 0.863568], [-1.223036, -1.223036]])  # OpenRLHF's numbers (its pad: ignored)


def test_batch_whitening_weighs_a_completion_by_its_tokens_across_micro_batches():
    # REINFORCE++-baseline (OpenRLHF reinforce_baseline): rewards [1, 0, 1, 1] in groups of 2, minus the
    # group mean -> [0.5, -0.5, 0, 0]; two tokens each: mean 0, population std 0.5 / sqrt(2) -> +-sqrt(2), 0.
    centred = group_advantages(t(1, 0, 1, 1), 2, scale="none")
    two_tokens = torch.ones(2, 2, dtype=torch.long)
    first, second = batch_whiten([centred[:2], centred[2:]], [two_tokens, two_tokens])
    close(torch.cat([first, second]), [math.sqrt(2), -math.sqrt(2), 0.0, 0.0])
    # One advantage per completion counts once per token: [B] and its [B, T] expansion agree.
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    (per_row,) = batch_whiten([t(2.0, -1.0)], [mask])
    (per_token,) = batch_whiten([t(2.0, -1.0).unsqueeze(1) * mask], [mask])
    close(per_token, (per_row.unsqueeze(1) * mask).tolist())
    close(per_row, [1 / math.sqrt(3), -math.sqrt(3)])  # tokens [2, 2, 2, -1]: mean 1.25, std sqrt(27/16)
