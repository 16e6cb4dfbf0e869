"""MEMIT, mass-editing memory in a transformer (Meng et al. 2023, section 4): a batch of edits
spread over several consecutive MLP layers.

    polmctl run recipe=edit method.algorithm=memit method.max_requests=10
    polmctl run recipe=edit method.algorithm=memit "method.layers=[3,4,5,6]"

For each request i, the hidden state at the last edited layer L (the residual stream at the
subject's last token) gets a target z_i = h_i + delta_i, delta_i optimised so the model says
target_new (polmctl.editing.memory.optimise_value on the decoder layer's output). Then, layer by
layer (l = l_1 .. L), with K the requests' keys at l (averaged over prefixes, on the model as
edited so far) and R the residuals z_i - h_i^L still missing, divided evenly among the layers
left (eq. 20 of the paper):

    Delta_l = R_l K^T (lambda C_l + K K^T)^-1,   R_l = (Z - H^L) / (number of layers left)

lambda (``update_weight``) weighs keeping the calibration keys' values (C_l = E[k k^T]) against
writing the new ones; each layer's update has rank at most the number of requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polmctl.editing.hooks import decoder_layer, mlp_down
from polmctl.editing.memory import ValueSettings, bare_values, optimise_value, subject_keys
from polmctl.editing.requests import EditRequest


@dataclass
class LayerUpdate:
    layer: int
    matrix: torch.Tensor  # added to down_proj.weight, [hidden, intermediate]
    residual_before: float  # mean |z_i - h_i^L| before this layer's update


@dataclass
class MemitResult:
    updates: list[LayerUpdate]
    residual_after: float  # mean |z_i - h_i^L| once every layer is updated
    target_probs: list[float]  # each request's target_new probability with its z in place


def layer_update(keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, update_weight: float) -> torch.Tensor:
    """R K^T (lambda C + K K^T)^-1 for keys [n, d] and residuals [n, hidden]: [hidden, d]."""
    k = keys.double().to(cov.device)
    a = update_weight * cov.double() + k.T @ k
    adjusted = torch.linalg.solve(a, k.T)  # [d, n]
    return residuals.double().to(cov.device).T @ adjusted.T


def memit_edit(
    model,
    tokenizer,
    requests: list[EditRequest],
    layers: list[int],
    covs: dict[int, torch.Tensor],
    prefixes: list[str],
    settings: ValueSettings,
    update_weight: float,
    batch_size: int = 16,
) -> MemitResult:
    """Write every request into the down_proj of each of ``layers`` (ascending) in place."""
    last = decoder_layer(model, layers[-1])
    values = [optimise_value(model, tokenizer, r, last, prefixes, settings) for r in requests]
    z = torch.stack([v.init + v.delta for v in values])
    updates = []
    for i, layer in enumerate(layers):
        keys = subject_keys(model, tokenizer, layer, requests, prefixes, batch_size, settings.fact_token)
        missing = z - bare_values(model, tokenizer, last, requests, batch_size, settings.fact_token)
        matrix = layer_update(keys, missing / (len(layers) - i), covs[layer], update_weight)
        weight = mlp_down(model, layer).weight
        with torch.no_grad():
            weight += matrix.to(weight.device, weight.dtype)
        updates.append(LayerUpdate(layer, matrix.float().cpu(), float(missing.norm(dim=-1).mean())))
    left = z - bare_values(model, tokenizer, last, requests, batch_size, settings.fact_token)
    return MemitResult(updates, float(left.norm(dim=-1).mean()), [v.prob_target for v in values])
