"""Preference losses as pure functions of per-sequence log-probs.

    polmctl run recipe=dpo | ipo | simpo | cpo | orpo      (the caller: polmctl/methods/preference.py)

``kto_loss`` serves recipe=kto (polmctl/methods/kto.py). Every function takes 1-D tensors of shape [B]
(summed or length-averaged log-probs, or scores, as each says) and returns
``(losses [B], metrics {name: [B]})``: the caller sums both, and the engine normalises
over the whole optimizer step. Nothing here calls a model.

The DPO formulas match ``DPOTrainer.dpo_loss`` of TRL's trl/trainer/dpo_trainer.py as of a
late-2025 main snapshot (the one whose ``loss_type`` list includes "sft"), and for bco_pair,
apo_zero, apo_down, exo_pair, nca_pair and sppo_hard the branches of TRL 1.16's
``DPOTrainer._compute_loss``; the others match TRL's CPOTrainer.cpo_loss (sigmoid, simpo),
ORPOTrainer.odds_ratio_loss and KTOTrainer.kto_loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]
DPO_LOSS_TYPES = tuple("sigmoid robust hinge ipo bco_pair apo_zero apo_down exo_pair nca_pair sppo_hard".split())


def _rewards(chosen: torch.Tensor, rejected: torch.Tensor) -> Metrics:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
    }


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al., 2023) and its variants on h = h_w - h_l, h_w = pc - rc, h_l = pr - rr,
    r_w = beta h_w, r_l = beta h_l, e = label_smoothing:

    sigmoid    -(1 - e) logsig(beta h) - e logsig(-beta h)          e = 0: DPO; e > 0: conservative DPO
    robust     ((1 - e) -logsig(beta h) + e logsig(-beta h)) / (1 - 2e)   robust DPO (Chowdhury et al., 2024)
    hinge      relu(1 - beta h)                                     SLiC (Zhao et al., 2023)
    ipo        (h - 1 / (2 beta))^2                                 IPO (Azar et al., 2023)
    bco_pair   -logsig(r_w) - logsig(-r_l)                          BCO (Jung et al., 2024), no reward shift
    apo_zero   (1 - sig(r_w)) + sig(r_l)                            APO-zero (D'Oosterlinck et al., 2024, eq. 7)
    apo_down   sig(r_w) + (1 - sig(r_w - r_l))                      APO-down (eq. 8)
    exo_pair   q log(q / (1 - e)) + (1 - q) log((1 - q) / e), q = sig(beta h)   EXO-pref (Ji et al., 2024, eq. 16)
    nca_pair   -logsig(r_w) - logsig(-r_w) / 2 - logsig(-r_l) / 2   NCA (Chen et al., 2024)
    sppo_hard  (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2      SPPO with hard P = 1 / 0 (Wu et al., 2024, eq. 4.7)

    exo_pair reads ``label_smoothing`` as EXO's epsilon and needs it in (0, 1) (the paper suggests
    1e-3); hinge, ipo and the other new types ignore it, as TRL does. bco_pair is TRL 1.16's: the
    BCO paper (and TRL <= 0.28's bco_pair, trl.experimental.bco) also shifts both rewards by delta,
    a running mean of past rewards; that running state is not kept here, so bco_pair is BCO with
    delta = 0. IPO is defined on length-averaged log-probs (TRL divides by the completion length
    when the loss is ipo): for that, pass summed log-prob / completion length for all four inputs;
    every other type takes summed log-probs, as TRL. Rewards are beta (policy - ref) of whatever
    was passed in.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing!r}")
    if loss_type == "exo_pair" and not 0 < label_smoothing < 1:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (EXO's epsilon, e.g. 1e-3), got {label_smoothing!r}")
    h_w, h_l = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h, r_w, r_l = h_w - h_l, beta * h_w, beta * h_l
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(r_w) - F.logsigmoid(-r_l)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(r_w)) + torch.sigmoid(r_l)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(r_w) + (1 - torch.sigmoid(r_w - r_l))
    elif loss_type == "exo_pair":  # KL(softmax over {w, l} of beta h || [1 - e, e]), log-sigmoids for stability
        log_q_w, log_q_l = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
        losses = log_q_w.exp() * (log_q_w - math.log1p(-e)) + log_q_l.exp() * (log_q_l - math.log(e))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    else:  # sppo_hard
        losses = (h_w - 1 / (2 * beta)) ** 2 + (h_l + 1 / (2 * beta)) ** 2
    return losses, _rewards(r_w, r_l)


def simpo_loss(
    policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, *, beta: float, gamma: float
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al., 2024): -logsig(beta (avg_c - avg_r) - gamma), where avg is the summed
    log-prob / completion length. ``gamma`` is the paper's absolute margin, the same number as
    TRL's ``simpo_gamma`` (trl/experimental/cpo/cpo_trainer.py subtracts simpo_gamma / beta from
    the log-ratio before scaling it by beta). Rewards are beta avg."""
    losses = -F.logsigmoid(beta * (policy_chosen_avg - policy_rejected_avg) - gamma)
    return losses, _rewards(beta * policy_chosen_avg, beta * policy_rejected_avg)


def cpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, Metrics]:
    """CPO's preference term (Xu et al., 2024): -logsig(beta (pc - pr)) on summed log-probs,
    with no reference model. The caller adds the NLL of the chosen answer. Rewards are beta logp."""
    losses = -F.logsigmoid(beta * (policy_chosen - policy_rejected))
    return losses, _rewards(beta * policy_chosen, beta * policy_rejected)


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logp), i.e. avg - log(1 - exp(avg)).

    log(1 - exp(x)) is -inf at x = 0 (a completion the model is certain of), so x is kept
    at most -1e-6. It is computed as log(-expm1(x)) rather than log1p(-exp(x)): near 0 the
    latter loses the digits of the small 1 - exp(x) (in float32, 5e-4 relative at x = -1e-5).
    """
    x = avg_logp.clamp(max=-1e-6)
    return x - torch.log(-torch.expm1(x))


def orpo_loss(
    chosen_avg_logp: torch.Tensor, rejected_avg_logp: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, Metrics]:
    """ORPO's odds-ratio term (Hong et al., 2024): -beta logsig(log odds_c - log odds_r), with
    log odds = log(p / (1 - p)) and p = exp(length-averaged log-prob). The caller adds the NLL
    of the chosen answer. Metrics: ``log_odds_ratio`` = log odds_c - log odds_r,
    ``log_odds_chosen`` = log odds_c, rewards beta avg. (TRL logs other quantities under these
    names: logsig of the difference as ``log_odds_ratio``, the difference as ``log_odds_chosen``.)
    """
    log_odds_chosen = _log_odds(chosen_avg_logp)
    ratio = log_odds_chosen - _log_odds(rejected_avg_logp)
    metrics = _rewards(beta * chosen_avg_logp, beta * rejected_avg_logp)
    metrics.update({"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds_chosen.detach()})
    return -beta * F.logsigmoid(ratio), metrics


def kto_kl_estimate(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point (Ethayarajh et al., 2024): mean(policy - ref) over mismatched
    prompt/completion pairs, clamped at 0 and detached (no gradient flows through it).

    With several processes, average the unclamped mean across them before clamping, as TRL
    does; this function sees only its own batch.
    """
    return (policy_mismatched_logps - ref_mismatched_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO on summed log-probs with r = policy - ref and ``labels`` True for desirable rows:

    desirable    w_d (1 - sig(beta (r - kl)))
    undesirable  w_u (1 - sig(beta (kl - r)))

    ``kl`` is the batch reference point from ``kto_kl_estimate``. ``rewards/chosen`` is beta r
    on desirable rows and 0 elsewhere (``rewards/rejected`` the reverse); ``desirable`` (1/0)
    lets the caller turn their sums into means over each subset.
    """
    labels = labels.bool()
    r = policy_logps - ref_logps
    losses = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))),
    )
    rewards = (beta * r).detach()
    zero = torch.zeros_like(rewards)
    return losses, {
        "rewards/chosen": torch.where(labels, rewards, zero),
        "rewards/rejected": torch.where(labels, zero, rewards),
        "desirable": labels.to(rewards.dtype),
        "kl": kl.detach().to(rewards.dtype).expand_as(rewards),
    }
