"""Low-rank compression: chosen Linear layers replaced by the two factors of a truncated SVD.

    polmctl run recipe=lowrank                                          # 80% of each layer's parameters, ASVD
    polmctl run recipe=lowrank method.rank_by=energy method.energy=0.95 method.activation_aware=false

A weight W [out, in] becomes ``up @ down`` with ``down`` [r, in] and ``up`` [out, r]
(models/replaced.py ``LowRankLinear``): r * (in + out) parameters instead of in * out, fewer when
r < in * out / (in + out) (the break-even rank; a layer that would need more keeps its W).

Rank (``method.rank_by``):
  energy  the smallest r whose singular values keep ``energy`` of the sum of squares (Eckart-Young:
          the relative Frobenius error of the rank-r truncation is sqrt(1 - energy kept))
  params  r = floor(ratio * in * out / (in + out)): the factors keep ``param_ratio`` of the parameters

Activation-aware (``method.activation_aware``, ASVD: Yuan et al., 2023, "ASVD: Activation-aware
Singular Value Decomposition for Compressing Large Language Models"): input channel j is scaled by
s_j = ||X_j||^alpha (X_j: channel j over the calibration tokens, alpha=0.5 as the paper) before
the SVD, W S = U Sigma V^T, and unscaled after: down = Sigma_r^1/2 V_r^T S^-1, up = U_r Sigma_r^1/2.
The truncation then drops what the inputs use least, not what W holds least. One pass of the dense
model gives every layer's norms (as Wanda's here), not the paper's layer-by-layer refresh.

The SVD is ``torch.linalg.svd`` in float64: the factorisation is the library call; what is written
here is the rank choice and the scaling around it, which no maintained library does for a
transformers model's Linear layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from polmctl.models.replaced import LowRankLinear

RANK_BY = ("energy", "params")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose top singular values hold at least ``energy`` of sum(s^2)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    sq = singular_values.double().pow(2)
    kept = sq.cumsum(0) / sq.sum()
    # a hair of tolerance: the cumulative sum of an exact split lands a rounding error below it
    return int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=kept.dtype)).item()) + 1


def break_even_rank(out_features: int, in_features: int) -> int:
    """The rank at which the two factors hold as many parameters as W (ranks below it save some)."""
    return in_features * out_features // (in_features + out_features)


def param_ratio_rank(out_features: int, in_features: int, ratio: float) -> int:
    """The rank whose factors keep ``ratio`` of the ``out x in`` parameters (at least 1)."""
    if not 0 < ratio < 1:
        raise ValueError(f"param_ratio must be in (0, 1), got {ratio!r}")
    return max(1, math.floor(ratio * in_features * out_features / (in_features + out_features)))


def activation_scales(act_norm: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's per-input-channel scales ||X_j||^alpha, with channels that saw no signal kept at the
    smallest positive scale so S stays invertible."""
    s = act_norm.double().clamp(min=0).pow(alpha)
    positive = s[s > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=s.dtype)
    return torch.where(s > 0, s, floor)


@dataclass
class Factors:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    energy_kept: float  # of the (scaled) weight's squared singular values


def factorize(
    weight: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    column_scale: torch.Tensor | None = None,
) -> Factors:
    """Truncated SVD of ``weight`` [out, in] at ``rank``, or at the ``energy`` rank; with ``column_scale``
    (activation-aware) the SVD is of ``weight * column_scale`` and the scale is taken back out of ``down``."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    w = weight.detach().double()
    scale = None if column_scale is None else column_scale.to(w.device, torch.float64)
    scaled = w if scale is None else w * scale.unsqueeze(0)
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    r = energy_rank(s, energy) if energy is not None else rank
    r = max(1, min(r, s.numel()))
    root = s[:r].sqrt()
    down = root.unsqueeze(1) * vh[:r]
    if scale is not None:
        down = down / scale.unsqueeze(0)
    up = u[:, :r] * root.unsqueeze(0)
    kept = float(s[:r].pow(2).sum() / s.pow(2).sum()) if s.pow(2).sum() > 0 else 1.0
    return Factors(down=down.to(weight.dtype), up=up.to(weight.dtype), energy_kept=kept)


def relative_error(weight: torch.Tensor, factors: Factors) -> float:
    """||W - up @ down||_F / ||W||_F."""
    w = weight.detach().double()
    return float(torch.linalg.norm(w - factors.up.double() @ factors.down.double()) / torch.linalg.norm(w))


def output_error(weight: torch.Tensor, factors: Factors, inputs: torch.Tensor) -> float:
    """||X W^T - X (up down)^T||_F / ||X W^T||_F on ``inputs`` [tokens, in]: the error the layer's outputs see."""
    x, w = inputs.double(), weight.detach().double()
    approx = factors.up.double() @ factors.down.double()
    return float(torch.linalg.norm(x @ (w - approx).T) / torch.linalg.norm(x @ w.T))


@torch.no_grad()
def compress_linears(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    *,
    rank_by: str,
    energy: float = 0.9,
    param_ratio: float = 0.5,
    act_norms: dict[str, torch.Tensor] | None = None,
    alpha: float = 0.5,
) -> dict[str, dict]:
    """Replace each of ``linears`` (base-model names) in ``model`` by a ``LowRankLinear`` whose rank
    ``rank_by`` chooses; ``act_norms`` makes it activation-aware. Returns per layer: the rank, the
    break-even rank, the energy kept, the relative weight error, and ``kept_dense`` for a layer whose
    rank would not save parameters (left as it was)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    report = {}
    for name, linear in linears.items():
        out_f, in_f = linear.weight.shape
        limit = break_even_rank(out_f, in_f)
        scale = activation_scales(act_norms[name], alpha) if act_norms is not None else None
        if rank_by == "energy":
            factors = factorize(linear.weight, energy=energy, column_scale=scale)
        else:
            factors = factorize(linear.weight, rank=param_ratio_rank(out_f, in_f, param_ratio), column_scale=scale)
        rank = factors.down.shape[0]
        entry = {
            "rank": rank,
            "break_even_rank": limit,
            "energy_kept": factors.energy_kept,
            "relative_error": relative_error(linear.weight, factors),
            "kept_dense": rank >= limit,
        }
        report[name] = entry
        if entry["kept_dense"]:
            continue
        low = LowRankLinear(
            in_f, out_f, rank, linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device
        )
        low.down.weight.copy_(factors.down)
        low.up.weight.copy_(factors.up)
        if linear.bias is not None:
            low.up.bias.copy_(linear.bias)
        base.set_submodule(name, low)
    return report


@torch.no_grad()
def densify(model: nn.Module) -> int:
    """Every LowRankLinear back into one nn.Linear holding ``up @ down`` (a standard architecture
    any transformers loads; the truncation's error stays, the parameter saving goes). Returns how many."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    low = [(n, m) for n, m in base.named_modules() if isinstance(m, LowRankLinear)]
    for name, module in low:
        weight = module.dense_weight()
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            module.up.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        linear.weight.copy_(weight)
        if module.up.bias is not None:
            linear.bias.copy_(module.up.bias)
        base.set_submodule(name, linear)
    return len(low)
