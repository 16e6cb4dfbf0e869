"""ROME, rank-one model editing (Meng et al. 2022, "Locating and Editing Factual Associations in
GPT", section 3): one fact written into one MLP's down_proj by a rank-one update.

    polmctl run recipe=edit                                  # ROME, the layer from causal tracing
    polmctl run recipe=edit method.layer=6 method.max_requests=1

The down_proj W of layer l maps keys k (the MLP's intermediate activation) to values. The key of
the subject, k*, is its key at the subject's last token averaged over prompts with different
prefixes; C = E[k k^T] over calibration text. The value v* = W k* + delta, delta optimised so the
model says target_new (polmctl.editing.memory.optimise_value). The update solves
min |W' K - V| subject to W' k* = v* (eq. 2 of the paper):

    W' = W + Lambda (C^-1 k*)^T,    Lambda = (v* - W k*) / ((C^-1 k*)^T k*) = delta / (u . k*)

with u = C^-1 k*: keys unlike the subject's (in the metric of C) barely move. Several requests
are applied one after another, each on the model the previous one left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polmctl.editing.hooks import mlp_down
from polmctl.editing.memory import ValueResult, ValueSettings, optimise_value, solve_covariance, subject_keys
from polmctl.editing.requests import EditRequest


@dataclass
class RankOneUpdate:
    layer: int
    left: torch.Tensor  # u = C^-1 k*, [intermediate]
    right: torch.Tensor  # Lambda, [hidden]
    key: torch.Tensor  # k*
    value: ValueResult

    @property
    def matrix(self) -> torch.Tensor:
        """The update added to down_proj.weight ([hidden, intermediate])."""
        return torch.outer(self.right, self.left)


def rank_one_update(key: torch.Tensor, delta: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, Lambda) of W' = W + Lambda u^T: u = C^-1 k*, Lambda = delta / (u . k*), so W' k* = W k* + delta."""
    u = solve_covariance(cov, key)
    right = delta.double().to(u.device) / torch.dot(u, key.double().to(u.device))
    return u, right


@torch.no_grad()
def apply_update(model, layer: int, left: torch.Tensor, right: torch.Tensor) -> None:
    weight = mlp_down(model, layer).weight
    weight += torch.outer(right, left).to(weight.device, weight.dtype)


def rome_edit(
    model,
    tokenizer,
    request: EditRequest,
    layer: int,
    cov: torch.Tensor,
    prefixes: list[str],
    settings: ValueSettings,
    batch_size: int = 16,
) -> RankOneUpdate:
    """Write ``request`` into ``layer``'s down_proj in place; returns the update."""
    key = subject_keys(model, tokenizer, layer, [request], prefixes, batch_size, settings.fact_token)[0]
    value = optimise_value(model, tokenizer, request, mlp_down(model, layer), prefixes, settings)
    left, right = rank_one_update(key, value.delta, cov)
    apply_update(model, layer, left, right)
    return RankOneUpdate(layer, left.float().cpu(), right.float().cpu(), key.cpu(), value)
