"""Unlearning losses as pure functions of per-sequence log-probs and per-position logits.

    polmctl run recipe=unlearn method.loss=gradient_ascent | npo | simnpo method.retain=none | nll | kl

(the caller: polmctl/methods/unlearn.py). A forget term pushes the likelihood of the forget-set's
answers down; a retain term keeps the retain-set where it was. Each forget function takes [B]
tensors of one row per forget example and returns its per-row losses [B]; the caller sums them
and the engine divides by the step's rows. Nothing here calls a model.

The formulas are the official code's: NPO from licong-lin/negative-preference-optimization
(TOFU/dataloader.py, loss_type "npo", commit 1207bbe), SimNPO from OPTML-Group/Unlearn-Simple
(TOFU/dataloader.py, loss_type "simnpo", commit f1a355d), the retain KL from the former's "npo_KL".
TRL has no unlearning trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORGET_LOSSES = ("gradient_ascent", "npo", "simnpo")


def gradient_ascent_loss(avg_logps: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget-set NLL: the loss is each answer's mean token log-prob,
    log pi(y|x) / |y| (= -NLL per token), so minimising it raises the NLL without bound. TOFU's
    grad_ascent negates HF's token mean over the whole batch; this is the mean per answer, then
    over answers (the same when the answers have equal lengths)."""
    return avg_logps


def npo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *, beta: float) -> torch.Tensor:
    """NPO (Zhang et al., 2024), on summed log-probs of the forget answers:

        -(2 / beta) logsig(-beta (log pi(y|x) - log pi_ref(y|x)))

    (the code's -logsig(beta (NLL - NLL_ref)) * 2 / beta). It is (2 / beta) ln 2 where the policy
    equals the reference, and its gradient is gradient ascent's on log pi(y|x) weighted by
    2 sig(beta (log pi - log pi_ref)): 1 at the start, fading as the answer becomes less likely
    than under the reference, which is what keeps NPO from collapsing as gradient ascent does."""
    return -(2 / beta) * F.logsigmoid(-beta * (policy_logps - ref_logps))


def simnpo_loss(policy_logps: torch.Tensor, lengths: torch.Tensor, *, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO (Fan et al., 2024): NPO without a reference, on the length-normalised log-prob,

        -(2 / beta) logsig(beta (NLL(y|x) / |y| - gamma)) = -(2 / beta) logsig(-beta log pi(y|x) / |y| - beta gamma)

    as the official code (``get_batch_loss(...) / loss_mask.sum(-1) - self.gamma``, then
    ``-F.logsigmoid(self.beta * forget_loss).mean() * 2 / self.beta``). The paper writes the margin
    outside the scale, -(2 / beta) logsig(-(beta / |y|) log pi(y|x) - gamma'): gamma' = beta gamma.
    ``lengths`` are the answers' token counts."""
    nll = -policy_logps / lengths.clamp(min=1)
    return -(2 / beta) * F.logsigmoid(beta * (nll - gamma))


def retain_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi) at each position ([n, V] logits -> [n]): sum_v p_ref (log p_ref - log p),
    the summand of NPO-KL's ``F.kl_div(log p, log p_ref, log_target=True)``. (Its code divides the sum
    by every position of the batch, prompts and padding included; the caller averages over the
    retain answers' positions instead.)"""
    logp, log_ref = F.log_softmax(policy_logits.float(), dim=-1), F.log_softmax(ref_logits.float(), dim=-1)
    return (log_ref.exp() * (log_ref - logp)).sum(dim=-1)
