"""Scalar helpers for checking losses against their formulas by hand."""

from __future__ import annotations

import math

import torch


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def softplus(x: float) -> float:
    """log(1 + e^x) = -logsigmoid(-x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, t(*expected))


def grads(loss_fn, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss_fn(chosen, rejected)[0].sum().backward()
    return chosen.grad, rejected.grad
