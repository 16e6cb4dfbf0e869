"""Attention for padding-free packed batches: each packed row attends only to itself, at the
cost of its own length, not the pack's.

    polmctl run recipe=lora                         # SFT recipes pack by default (data.packing=true)
    polmctl run recipe=sft data.packing=false       # right-padded micro-batches instead

A packed micro-batch is one sequence of all its rows, ``position_ids`` restarting at 0 for
each (data/collate.py ``pack_collate``). transformers' SDPA path turns the restarts into a
block-diagonal mask over the whole pack: correct, but its attention costs pack length
squared (on 8 rows of ~70 tokens, more than the padding it saves). flash-attention's varlen
kernel runs each row alone but needs a CUDA GPU. ``packed_sdpa`` does what varlen does with
PyTorch's SDPA: one causal attention call per row of the pack, so the projections and MLPs
(most of the FLOPs) see no padding and attention costs what it costs on a padded batch.
Registered with transformers' AttentionInterface; every other batch (padded, cached,
generation) goes to transformers' own SDPA function with transformers' own mask, unchanged.
"""

from __future__ import annotations

import torch

NAME = "polmctl_packed_sdpa"


def _row_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start of each packed row and the end: where positions do not go up by one."""
    positions = position_ids.reshape(-1)
    starts = (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1
    return [0, *starts.tolist(), positions.numel()]


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """transformers' attention-function signature: query [B, H, T, D], key/value [B, H_kv, S, D];
    returns ([B, T, H, D], None). A batch of one packed row (position_ids restarting inside it, no
    cache) runs causal SDPA row by row; anything else is transformers' ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    packed = (positions is not None and query.size(0) == 1 and query.size(2) == key.size(2)
              and positions.size(-1) == query.size(2))
    bounds = _row_bounds(positions) if packed else []
    if len(bounds) <= 2:  # not packed, or one row only
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                                   scaling=scaling, is_causal=True)[0] for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(rows, dim=1), None


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a model on transformers' SDPA attention to ``packed_sdpa`` (once; later calls are
    free). Models on another attention (flash-attention already runs packed rows alone; eager)
    are left as they are. Returns whether the model now uses it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == NAME:
        return True
    if implementation != "sdpa" or not hasattr(inner, "set_attn_implementation"):
        return False
    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # non-packed batches keep SDPA's own masks
    inner.set_attn_implementation(NAME)
    return True
