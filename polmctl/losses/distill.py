"""Knowledge-distillation divergences between a student's and a teacher's next-token
distributions: pure functions of logits, one value per token (the vocabulary summed out).

With p_T = softmax(teacher_logits / T) and p_S = softmax(student_logits / T):

  forward_kl   KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)
               mean-seeking: the student spreads over every mode of the teacher (classic KD,
               Hinton et al., 2015; what supervised KD on fixed data minimises)
  reverse_kl   KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)
               mode-seeking: the student may drop modes it cannot fit (MiniLLM, Gu et al., 2024)
  jsd (beta)   beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S
               the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024, Eq. 1)

Which way round: the conventions of TRL's ``GKDTrainer.generalized_jsd_loss``
(huggingface/trl trl/experimental/gkd/gkd_trainer.py @ 7310b81fbd40177a60078ea26122c9fec5b092b8):
beta is the teacher's weight in the mixture M; ``beta = 0`` IS the forward KL
KL(teacher || student) and ``beta = 1`` IS the reverse KL KL(student || teacher) (both are
special-cased, as in TRL: the JSD formula itself vanishes at either end, behaving like
beta * forward KL for small beta and (1 - beta) * reverse KL for beta near 1). For
beta = 0.5 the JSD is symmetric in student and teacher and lies in [0, ln 2].

Temperature: both distributions are softened by the same T, and the divergence is then
multiplied by T^2 (Hinton et al., 2015). The gradient of a softened KL with respect to the
student's logits shrinks like 1/T^2 as T grows (it tends to (z_S - z_T) / (N T^2) for N
classes), so the T^2 factor keeps the distillation term's size, and its balance against the
SFT term (method.sft_weight), independent of the chosen T. TRL's generalized_jsd_loss does
not rescale (its default T is 1, where both agree).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("forward_kl", "reverse_kl", "jsd")


def softened_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) over the last dim, in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kl(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probs: sum_v p (log p - log q).

    (``F.kl_div(input, target)`` computes KL(target || input): the order is swapped.)"""
    return F.kl_div(q_logps, p_logps, reduction="none", log_target=True).sum(-1)


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD(beta) per row: beta KL(p_T || M) + (1 - beta) KL(p_S || M), M = beta p_T + (1 - beta) p_S;
    beta = 0: KL(p_T || p_S) (forward), beta = 1: KL(p_S || p_T) (reverse)."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if beta == 0:
        return kl(teacher_logps, student_logps)
    if beta == 1:
        return kl(student_logps, teacher_logps)
    mixture = torch.logsumexp(torch.stack([teacher_logps + math.log(beta), student_logps + math.log1p(-beta)]), dim=0)
    return beta * kl(teacher_logps, mixture) + (1 - beta) * kl(student_logps, mixture)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """T^2 x the chosen divergence between the softened distributions, one value per row
    (logits [..., V] -> [...]). The teacher's logits carry no gradient."""
    if loss not in LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; use one of {', '.join(LOSSES)}")
    student = softened_log_probs(student_logits, temperature)
    teacher = softened_log_probs(teacher_logits.detach(), temperature)
    if loss == "forward_kl":
        value = kl(teacher, student)
    elif loss == "reverse_kl":
        value = kl(student, teacher)
    else:
        value = generalized_jsd(student, teacher, beta)
    return value * temperature**2
