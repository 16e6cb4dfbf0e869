"""Online-RL losses as pure functions of rewards, per-token log-probs and values.

    polmctl run recipe=grpo | rloo | ppo     (the callers: polmctl/methods/grpo.py, polmctl/methods/ppo.py)

Group-relative methods (GRPO, RLOO, Dr. GRPO, DAPO, GSPO, CISPO) sample G completions per prompt,
turn their scalar rewards into one advantage per completion (``group_advantages``) and train
on ``clipped_policy_loss``. REINFORCE++ folds a per-token KL into the reward
(``kl_shaped_returns``) and normalises advantages over the whole batch (``batch_whiten``).
PPO adds a value head: per-token rewards -> ``gae`` -> ``whiten``ed advantages, and
``clipped_value_loss``. Per-token tensors are [B, T] over the
completion tokens, right-padded, with ``mask`` 1 on real tokens. Nothing here calls a model.

The losses return ``(loss_sum, weight, metrics)`` for the engine's contract (LossTerms in
polmctl/engine/contract.py): the engine divides the summed ``loss_sum`` of a step's micro-batches
by their summed ``weight``, and a metric is a ``(sum, count)`` pair whose ratio is a mean
over the masked tokens. On one micro-batch ``loss_sum / weight`` is TRL's loss.

Formulas match TRL's trl/trainer/grpo_trainer.py (``GRPOTrainer._compute_loss`` and the
advantage block of ``_generate_and_score_completions``; read at commit d2b69d7, and for
loss_type "dapo" as added by TRL PR #3938, e.g. commit a08e713 L2547-2562; for GSPO's
importance_sampling_level="sequence" and loss_type "cispo", TRL 1.16's ``_compute_loss``) and, for PPO,
``PPOTrainer.train`` in trl/trainer/ppo_trainer.py with ``masked_whiten`` from trl/trainer/utils.py.
REINFORCE++ follows OpenRLHF (commit 3c3be62): ``compute_reward``, ``get_cumulative_returns`` and
the global advantage normalisation of openrlhf/trainer/ppo_utils/experience_maker.py.
"""

from __future__ import annotations

import torch

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")
IMPORTANCE_LEVELS = ("token", "sequence", "sequence_mean")
BASELINES = ("mean", "leave_one_out", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] -> [N / G, G], one row per prompt."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 to compare completions of a prompt, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size} consecutive completions"
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "std", baseline: str = "mean", eps: float = 1e-4
) -> torch.Tensor:
    """One advantage per completion, from rewards laid out as consecutive groups of G:

    baseline mean            A_i = r_i - mean(group)                   GRPO
    baseline leave_one_out   A_i = r_i - mean(others) = G/(G-1) (r_i - mean(group))   RLOO
    baseline none            A_i = r_i (scale none only)               REINFORCE++ before ``batch_whiten``
    scale std                A_i / (std(group) + eps)                  GRPO (TRL scale_rewards)
    scale none               A_i unscaled                              Dr. GRPO

    std is torch's default, unbiased (divides by G - 1), as TRL's ``rewards.view(-1, G).std(dim=1)``;
    eps = 1e-4 as in TRL. A group of equal rewards gets advantage exactly 0: float32 may round
    its mean away from the common value, and dividing that residue by eps would turn it into a
    sizeable advantage.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {BASELINES}")
    if scale not in ("std", "none"):
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    groups = _grouped(rewards, group_size)
    if baseline == "none":  # the reward itself: nothing is subtracted, so equal groups keep their value
        if scale != "none":
            raise ValueError("baseline 'none' leaves rewards uncentred: scaling by the group std needs a baseline")
        return rewards.clone()
    mean = groups.mean(dim=1, keepdim=True)
    if baseline == "mean":
        advantages = groups - mean
    else:
        advantages = groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    if scale == "std":
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(advantages), advantages).reshape(-1)


def _zero_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N / G] True where a group's rewards are all equal (TRL's isclose(std, 0))."""
    std = _grouped(rewards, group_size).std(dim=1)
    return torch.isclose(std, torch.zeros_like(std))


def zero_variance_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal: they carry no signal (advantage 0).
    TRL logs it as ``frac_reward_zero_std``; DAPO's dynamic sampling drops such groups."""
    return _zero_std(rewards, group_size).float().mean().item()


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] bool: True on the rows of groups whose rewards differ (the rows DAPO keeps)."""
    return (~_zero_std(rewards, group_size)).repeat_interleave(group_size)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1
    (Schulman, "Approximating KL divergence"): >= 0, and 0 where logp = ref. As TRL GRPO."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def k1_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate k1 = logp - ref_logp (negative where the policy is less likely than the
    reference), clamped to [-10, 10] and 0 on padding: OpenRLHF's ``compute_approx_kl`` with
    kl_estimator "k1", the KL REINFORCE++ folds into the reward."""
    return torch.where(mask > 0, (logps - ref_logps).clamp(-10, 10), 0.0)


def kl_shaped_returns(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, coef: float) -> torch.Tensor:
    """REINFORCE++'s per-token returns (Hu et al., 2025; OpenRLHF's ``compute_reward`` and
    ``get_cumulative_returns`` with gamma = 1): completion i's reward r_i lands on its last token,
    every token pays -coef kl_t, and token t returns the sum from t to the end,

        G_t = r_i - coef sum_{s >= t} kl_s        ([B, T]; 0 on padding; ``mask`` right-padded).
    """
    mask = mask.to(kl.dtype)
    per_token = -coef * kl * mask
    last = mask.size(1) - 1 - mask.flip(1).argmax(dim=1)
    per_token[torch.arange(mask.size(0)), last] += rewards.to(kl.dtype)
    return per_token.flip(1).cumsum(dim=1).flip(1) * mask


def batch_whiten(values: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """REINFORCE++'s global advantage normalisation (OpenRLHF, estimators reinforce and
    reinforce_baseline): (A - mean) / sqrt(max(var, 1e-8)), one mean and one population variance
    (divided by N, not N - 1) over every completion token of all the micro-batches of a rollout
    (their widths differ, hence lists). A [B] entry (one advantage per completion) counts once per
    token of its completion and comes back [B]; a [B, T] entry comes back 0 on padding."""
    flat, weights = [], []
    for value, mask in zip(values, masks):
        mask = mask.to(value.dtype)
        if value.dim() == 1:
            flat.append(value)
            weights.append(mask.sum(dim=1))
        else:
            flat.append(value[mask > 0])
            weights.append(torch.ones_like(flat[-1]))
    x, w = torch.cat(flat), torch.cat(weights)
    if w.sum() < 1:
        raise ValueError("batch_whiten needs at least one completion token")
    mean = (x * w).sum() / w.sum()
    rstd = (((x - mean) ** 2 * w).sum() / w.sum()).clamp(min=1e-8).rsqrt()
    return [(v - mean) * rstd * (1 if v.dim() == 1 else m.to(v.dtype)) for v, m in zip(values, masks)]


def policy_loss_weight(mask: torch.Tensor, loss_type: str, importance_level: str = "token") -> int:
    """The normaliser of ``clipped_policy_loss`` for a batch, known before the forward pass:
    the number of sequences for grpo and dr_grpo (and for any sequence-level ratio), of
    completion tokens for dapo, bnpo and cispo."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance_level {importance_level!r}; expected one of {IMPORTANCE_LEVELS}")
    if loss_type == "cispo" and importance_level != "token":
        raise ValueError("loss_type 'cispo' weights each token by its own ratio: importance_level must be 'token'")
    sequences = loss_type in ("grpo", "dr_grpo") or importance_level != "token"
    return mask.size(0) if sequences else int(mask.sum())


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    importance_level: str = "token",
) -> tuple[torch.Tensor, int, Metrics]:
    """PPO-clip surrogate on tokens, with per-token ratio rho = exp(logp - old_logp) and A the
    row's advantage ([B], GRPO) or the token's ([B, T], PPO's GAE):

        l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3_t

    (the k3 term only when beta > 0; it needs ``ref_logps``). On-policy, pass
    old_logps = logps.detach(): rho is 1 but carries the gradient of logp. Normalisation,
    with T_i the tokens of row i, as TRL's ``loss_type``:

    grpo      mean_i (sum_t l / T_i)        loss_sum = sum_i (sum_t l / T_i),   weight = B
    dr_grpo   sum l / (B L)                 loss_sum = sum l / L,               weight = B
    dapo      sum l / sum_i T_i             loss_sum = sum l,                   weight = tokens
    bnpo      as dapo

    with L = ``max_completion_length`` (the generation limit, not the padded width). Summed
    over micro-batches, grpo and dr_grpo give TRL's mean over equal-sized micro-batches and
    dapo its count over the whole step (num_items_in_batch). TRL's bnpo averages the token
    mean of each micro-batch instead; that differs from dapo only across micro-batches.

    ``importance_level="sequence"`` (RLOO, Ahmadian et al., 2024, as TRL's RLOOTrainer): one ratio
    per completion, rho_i = exp(sum_t (logp - old_logp)), and one loss per completion,

        l_i = -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i) + beta mean_t k3_t,

    averaged over completions (loss_sum = sum_i l_i, weight = B, whatever ``loss_type``). The
    token-level ratio clips each token's change on its own; the sequence ratio clips the whole
    completion's likelihood change, which is what REINFORCE with a baseline estimates.

    ``importance_level="sequence_mean"`` (GSPO, Zheng et al., 2025; TRL GRPOTrainer's
    importance_sampling_level="sequence" with loss_type "grpo"): the same per-completion loss with
    the length-normalised ratio s_i = exp(mean_t (logp - old_logp)) = (pi(y_i) / pi_old(y_i))^(1/|y_i|),
    so a long completion's ratio stays near 1 and GSPO's small clip ranges (3e-4, 4e-4) apply to
    every length alike.

    ``loss_type="cispo"`` (CISPO, MiniMax-M1 2025; TRL's loss_type "cispo"): every token keeps its
    gradient, weighted by its ratio capped from above and detached,

        l_t = -sg(min(rho_t, 1 + eps_high)) A logp_t (+ beta k3_t),    loss_sum = sum l, weight = tokens.

    The cap is 1 + ``epsilon_high`` (the paper's eps_high^IS; TRL's ``epsilon_high`` is the cap itself,
    so TRL's 5.0 is 4.0 here); ``epsilon_low`` is not used (the paper sets no lower bound).

    Metrics, (sum, count) over masked tokens: ``clip_ratio/low`` (rho < 1 - eps_low, A < 0),
    ``clip_ratio/high`` (rho > 1 + eps_high, A > 0), ``clip_ratio/region`` (either: the
    tokens whose gradient the clip removes; cispo: the tokens whose weight is capped with A > 0,
    TRL's cispo_clip_ratio), ``ratio`` (mean rho), ``kl`` (mean k3; beta > 0).
    """
    weight = policy_loss_weight(mask, loss_type, importance_level)
    if importance_level != "token" and advantages.dim() != 1:
        raise ValueError(
            f"importance_level {importance_level!r} needs one advantage per completion ([B]), not per token"
        )
    if loss_type == "dr_grpo" and importance_level == "token" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the generation limit)")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps for the KL penalty")
    mask = mask.to(logps.dtype)
    real = mask > 0
    # Padded positions may hold any fill (-inf from a rollout engine): keep it out of exp, where
    # multiplying by the mask afterwards would leave inf * 0 = NaN in the loss or its gradient.
    log_ratio = torch.where(real, logps - old_logps, 0.0)
    a = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    if importance_level != "token":
        log_ratio = log_ratio.sum(dim=1, keepdim=True)  # [B, 1]
        if importance_level == "sequence_mean":
            log_ratio = log_ratio / mask.sum(dim=1, keepdim=True).clamp(min=1)
        ratio = torch.exp(log_ratio)
        per_row = -torch.min(ratio * a, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * a).squeeze(1)
        if beta > 0:
            kl = k3_kl(logps, torch.where(real, ref_logps, logps))
            per_row = per_row + beta * (kl * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return (
            per_row.sum(),
            weight,
            _clip_metrics(ratio.expand_as(mask), a, mask, epsilon_low, epsilon_high, kl if beta > 0 else None),
        )
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        capped = ratio.clamp(max=1 + epsilon_high).detach()
        per_token = -capped * a * torch.where(real, logps, 0.0)
    else:
        per_token = -torch.min(ratio * a, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * a)
    if beta > 0:
        kl = k3_kl(logps, torch.where(real, ref_logps, logps))
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss_type == "grpo":
        loss_sum = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    elif loss_type == "dr_grpo":
        loss_sum = per_token.sum() / max_completion_length
    else:
        loss_sum = per_token.sum()
    low = float("inf") if loss_type == "cispo" else epsilon_low  # cispo has no lower bound to count
    return loss_sum, weight, _clip_metrics(ratio, a, mask, low, epsilon_high, kl if beta > 0 else None)


def _clip_metrics(
    ratio: torch.Tensor,
    a: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    kl: torch.Tensor | None,
) -> Metrics:
    """clipped_policy_loss's metrics, (sum, count) over the masked tokens."""
    tokens = mask.sum().detach()
    low = (ratio < 1 - epsilon_low) & (a < 0)
    high = (ratio > 1 + epsilon_high) & (a > 0)

    def token_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.detach().to(mask.dtype) * mask).sum(), tokens

    metrics = {
        "clip_ratio/low": token_mean(low),
        "clip_ratio/high": token_mean(high),
        "clip_ratio/region": token_mean(low | high),
        "ratio": token_mean(ratio),
    }
    if kl is not None:
        metrics["kl"] = token_mean(kl)
    return metrics


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over completion tokens:

        delta_t = r_t + gamma V_{t+1} - V_t,    A_t = delta_t + gamma lam A_{t+1},    R_t = A_t + V_t

    with V and r taken as 0 on padding, so the value after the last real token is 0 and
    padded tokens add nothing; A and R are 0 there. ``mask`` must be right padding (1s then
    0s per row). The recursion is TRL PPOTrainer's; the results are targets, without gradient.
    """
    real = mask > 0
    mask = mask.to(values.dtype)
    rewards, values = torch.where(real, rewards, 0.0), torch.where(real, values, 0.0)
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1) * mask
    return advantages, advantages + values


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, var unbiased; with
    shift_mean=False the mean is added back (only the scale changes). Padded entries come
    back as 0. As TRL's ``masked_whiten`` followed by PPOTrainer's masked_fill."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    if n < 2:
        raise ValueError(f"whitening needs at least 2 masked entries, got {int(n)}")
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip_range: float
) -> tuple[torch.Tensor, int, Metrics]:
    """PPO's clipped value loss, a mean over masked tokens:

        0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

    ``loss_sum`` is the token sum and ``weight`` the token count. Metric
    ``value/clip_ratio``: tokens where the clipped term is the larger (TRL's vf_clipfrac).
    """
    mask = mask.to(values.dtype)
    clipped = values.clamp(old_values - clip_range, old_values + clip_range)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    loss_sum = (0.5 * torch.max(unclipped_loss, clipped_loss) * mask).sum()
    clip_sum = ((clipped_loss > unclipped_loss).to(mask.dtype) * mask).sum().detach()
    return loss_sum, int(mask.sum()), {"value/clip_ratio": (clip_sum, mask.sum().detach())}
