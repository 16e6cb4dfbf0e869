"""The distillation divergences (polmctl/losses/distill.py) against their formulas on hand-computed distributions."""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.losses import distill as L

pytestmark = pytest.mark.unit


def probs(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def kl_formula(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def loss_of(student, teacher, **options):
    return L.divergence(student, teacher, **options)


P_S = probs([0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1])

P_T = probs([0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25])
S, T = P_S.log(), P_T.log()


def test_forward_and_reverse_kl_match_their_formulas():
    assert torch.allclose(loss_of(S, T, loss="forward_kl").double(), kl_formula(P_T, P_S), atol=1e-6)
    assert torch.allclose(loss_of(S, T, loss="reverse_kl").double(), kl_formula(P_S, P_T), atol=1e-6)
    # logits need not be normalised: a constant shift per row changes nothing
    assert torch.allclose(loss_of(S + 3.0, T - 1.0, loss="forward_kl"), loss_of(S, T, loss="forward_kl"), atol=1e-6)


def test_divergences_of_equal_distributions_are_zero():
    for loss in L.LOSSES:
        assert torch.allclose(loss_of(S, S.clone(), loss=loss), torch.zeros(2), atol=1e-6), loss


def test_jsd_matches_its_formula_is_bounded_and_symmetric_at_one_half():
    for beta in (0.1, 0.5, 0.9):
        m = beta * P_T + (1 - beta) * P_S
        expected = beta * kl_formula(P_T, m) + (1 - beta) * kl_formula(P_S, m)
        assert torch.allclose(loss_of(S, T, loss="jsd", beta=beta).double(), expected, atol=1e-6), beta
    jsd = loss_of(S, T, loss="jsd", beta=0.5)
    assert torch.allclose(jsd, loss_of(T, S, loss="jsd", beta=0.5), atol=1e-7)
    # disjoint supports reach the bound ln 2; everything lies in [0, ln 2]
    far = loss_of(torch.tensor([[30.0, -30.0]]), torch.tensor([[-30.0, 30.0]]), loss="jsd", beta=0.5)
    assert far.item() == pytest.approx(math.log(2), abs=1e-5)
    random = loss_of(torch.randn(64, 10) * 3, torch.randn(64, 10) * 3, loss="jsd", beta=0.5)
    assert (random >= 0).all() and (random <= math.log(2) + 1e-6).all()


def test_jsd_beta_zero_is_forward_kl_and_one_is_reverse_kl():
    assert torch.allclose(loss_of(S, T, loss="jsd", beta=0.0), loss_of(S, T, loss="forward_kl"))
    assert torch.allclose(loss_of(S, T, loss="jsd", beta=1.0), loss_of(S, T, loss="reverse_kl"))
    # ... and near the ends the formula is beta x forward KL, (1 - beta) x reverse KL (GKD)
    eps = 1e-4
    assert torch.allclose(loss_of(S, T, loss="jsd", beta=eps) / eps, loss_of(S, T, loss="forward_kl"), rtol=1e-2)
    assert torch.allclose(loss_of(S, T, loss="jsd", beta=1 - eps) / eps, loss_of(S, T, loss="reverse_kl"), rtol=1e-2)


@pytest.mark.parametrize("loss", L.LOSSES)
def test_a_gradient_step_pulls_the_student_toward_the_teacher(loss):
    student = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    teacher = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * 2
    before = L.kl(L.softened_log_probs(teacher), L.softened_log_probs(student)).sum()
    loss_of(student, teacher, loss=loss, beta=0.5).sum().backward()
    assert teacher.grad is None
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
        after = L.kl(L.softened_log_probs(teacher), L.softened_log_probs(stepped)).sum()
    assert after < before


def test_forward_kl_gradient_is_t_times_the_softened_probability_gap():
    """d/dz_S [T^2 KL(p_T || p_S)] = T (p_S - p_T) with p = softmax(z / T): the student's
    logits move toward the teacher's, and T^2 keeps the gradient from vanishing like 1/T."""
    for temp in (1.0, 2.0, 4.0):
        student = S.float().clone().requires_grad_()
        loss_of(student, T.float(), loss="forward_kl", temperature=temp).sum().backward()
        gap = (S.float() / temp).softmax(-1) - (T.float() / temp).softmax(-1)
        assert torch.allclose(student.grad, temp * gap, atol=1e-6), temp


def test_temperature_softens_both_and_rescales_by_t_squared():
    for loss in L.LOSSES:
        plain = loss_of(S / 2.0, T / 2.0, loss=loss, beta=0.3)
        assert torch.allclose(loss_of(S, T, loss=loss, beta=0.3, temperature=2.0), 4.0 * plain, atol=1e-6), loss
    # At a high T the scaled forward KL tends to (1 / 2N) sum_i (centred logit gap)^2 (Hinton et al.)
    z_s, z_t = torch.tensor([[1.0, -2.0, 0.5, 3.0]]), torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    gap = (z_s - z_t) - (z_s - z_t).mean()
    high_t = loss_of(z_s, z_t, loss="forward_kl", temperature=200.0)
    assert high_t.item() == pytest.approx((gap**2).sum().item() / (2 * 4), rel=2e-2)
