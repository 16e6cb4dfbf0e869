"""The online-RL losses against values worked out by hand on small tensors.

.venv/bin/python -m pytest tests/losses/test_policy_gradient.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.losses.policy_gradient import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    informative_groups,
    k3_kl,
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
