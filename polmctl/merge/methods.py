"""Per-tensor merge functions: one tensor of each model in, the merged tensor out.

    polmctl run recipe=merge "method.models=[A,B]" method.merge=ties method.density=0.5

linear, task arithmetic, TIES and DARE are peft's own functions (``peft.utils.merge_utils``,
the ones ``add_weighted_adapter`` uses) applied to task vectors ``model - base``; only SLERP is
written here, because peft has none. Everything computes in float32.
"""

from __future__ import annotations

from typing import Sequence

import torch
from peft.utils import merge_utils

# Below this |cos| distance two vectors count as parallel and slerp falls back to lerp
# (sin(omega) ~ 0 would divide by ~0); the same threshold mergekit uses.
MERGES = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
TASK_VECTOR_MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties")  # they need a base model
SPARSIFYING = ("ties", "dare_linear", "dare_ties")  # they read method.density
SIGN_METHODS = ("total", "frequency")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SLERP_PARALLEL_EPS = 1e-4


def merge_tensor(
    merge: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    base: torch.Tensor | None = None,
    density: float = 1.0,
    majority_sign_method: str = "total",
    slerp_t: float = 0.5,
) -> torch.Tensor:
    """The merged tensor (float32) of ``tensors`` (one per model, same shape).

    linear: sum(w_i x_i) (the weights arrive normalized when averaging). The task-vector merges
    combine ``d_i = x_i - base`` with peft's function of the same name and add the result to
    ``base``. slerp: spherical interpolation of the two tensors at ``slerp_t``.
    """
    tensors = [t.float() for t in tensors]
    if merge == "slerp":
        return slerp(tensors[0], tensors[1], slerp_t)
    w = torch.tensor(list(weights), dtype=torch.float32)
    if merge == "linear":
        return merge_utils.task_arithmetic(tensors, w)  # a weighted sum, which is what linear is
    if base is None:
        raise ValueError(f"merge={merge} combines task vectors and needs the base tensor")
    base = base.float()
    deltas = [t - base for t in tensors]
    if merge == "task_arithmetic":
        return base + merge_utils.task_arithmetic(deltas, w)
    if merge == "ties":
        return base + merge_utils.ties(deltas, w, density, majority_sign_method)
    if merge == "dare_linear":
        return base + merge_utils.dare_linear(deltas, w, density)
    if merge == "dare_ties":
        return base + merge_utils.dare_ties(deltas, w, density, majority_sign_method)
    raise ValueError(f"unknown merge {merge!r}")


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation between two tensors, viewed as flat vectors.

    The direction moves along the great circle from v0's to v1's at a constant angular rate;
    with the usual formula sin((1-t)w)/sin(w) v0 + sin(tw)/sin(w) v1 on the raw vectors, the
    norm is interpolated smoothly too (equal norms stay equal). t=0 gives v0, t=1 gives v1;
    (anti)parallel or zero vectors fall back to linear interpolation.
    """
    a, b = v0.float().reshape(-1), v1.float().reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return torch.lerp(v0.float(), v1.float(), t)
    cos = torch.clamp(torch.dot(a / na, b / nb), -1.0, 1.0)
    if 1 - cos.abs() < SLERP_PARALLEL_EPS:
        return torch.lerp(v0.float(), v1.float(), t)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    out = torch.sin((1 - t) * omega) / sin * a + torch.sin(t * omega) / sin * b
    return out.reshape(v0.shape)
