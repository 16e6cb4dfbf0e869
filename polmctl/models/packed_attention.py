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

Rows that open with the same tokens (a chat template's system prompt: 24 of SmolLM2's ~70
tokens on the builtin arithmetic rows) share them: ``share_common_prefix`` keeps the prefix
once, at the head of the first row, and every later row continues from it with positions
that restart at the prefix's length instead of 0. ``packed_sdpa`` reads such a run as a
continuation: it attends to the first ``position`` tokens of the last row that started at 0,
then causally to itself. The prefix's keys and values get the summed gradient of every row
that reads them, so loss and gradients are the unshared pack's up to float rounding, for
the prefix's cost once instead of once per row. Written here because transformers and
PyTorch share a prefix only for generation (a KV cache without gradients).
"""

from __future__ import annotations

import torch

from polmctl.losses import IGNORE_INDEX

NAME = "polmctl_packed_sdpa"


def _runs(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, first position) of each run of a pack: a run ends where positions do not go up by one."""
    positions = position_ids.reshape(-1)
    starts = torch.cat([positions.new_zeros(1), (positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1])
    starts, firsts = torch.stack([starts, positions[starts]]).tolist()  # one host sync per layer
    return list(zip(starts, starts[1:] + [positions.numel()], firsts))


def packed_sdpa(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' attention-function signature: query [B, H, T, D], key/value [B, H_kv, S, D];
    returns ([B, T, H, D], None). A batch of one packed row (position_ids restarting inside it, no
    cache) runs causal SDPA row by row; anything else is transformers' ``sdpa_attention_forward``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    packed = (
        positions is not None
        and query.size(0) == 1
        and query.size(2) == key.size(2)
        and positions.size(-1) == query.size(2)
    )
    runs = _runs(positions) if packed else []
    if len(runs) <= 1:  # not packed, or one row only
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    rows, root, root_end = [], 0, 0
    for a, b, first in runs:
        if first == 0:  # a row of its own: causal over itself
            root, root_end = a, b
            rows.append(
                sdpa_attention_forward(
                    module,
                    query[:, :, a:b],
                    key[:, :, a:b],
                    value[:, :, a:b],
                    None,
                    dropout=dropout,
                    scaling=scaling,
                    is_causal=True,
                )[0]
            )
            continue
        if first > root_end - root:  # (also a pack whose first run does not start at 0)
            raise ValueError(
                f"packed_sdpa: a packed run starts at position {first}, but the row it would continue "
                f"has {root_end - root} tokens; position_ids must restart at 0 for each row "
                "(data/collate.py pack_collate) or continue a shared prefix (share_common_prefix)"
            )
        # A continuation of a shared prefix: the row's first `first` tokens, then itself, causally.
        keys = torch.cat([key[:, :, root : root + first], key[:, :, a:b]], dim=2)
        values = torch.cat([value[:, :, root : root + first], value[:, :, a:b]], dim=2)
        visible = torch.ones(b - a, first + b - a, dtype=torch.bool, device=query.device).tril(diagonal=first)
        rows.append(
            sdpa_attention_forward(
                module,
                query[:, :, a:b],
                keys,
                values,
                visible[None, None],
                dropout=dropout,
                scaling=scaling,
                is_causal=False,
            )[0]
        )
    return torch.cat(rows, dim=1), None


def common_prefix_length(sequences: list) -> int:
    """How many tokens all ``sequences`` open with, leaving each at least one token of its own."""
    limit = min(map(len, sequences)) - 1
    length = 0
    while length < limit and len({tokens[length] for tokens in sequences}) == 1:
        length += 1
    return length


def share_common_prefix(inputs: dict, labels: torch.Tensor) -> tuple[dict, torch.Tensor] | None:
    """A packed batch (``pack_collate``: ``input_ids``, ``position_ids`` and ``labels`` [1, T])
    with the tokens all its rows open with kept once, or None when there is nothing to share.

    The prefix stays at the head of the first row; every other row loses it and its positions
    go on from the prefix's length (``packed_sdpa`` attends it to the prefix). Only unlabelled
    tokens are shared, and the token after the prefix must be unlabelled in every row too: it
    is predicted from the prefix's last position in the first row but would be predicted from
    the previous row's last token in the others. So the labels come back the same, in the same
    order, with only unlabelled positions removed."""
    positions = inputs["position_ids"]
    if positions.size(0) != 1 or set(inputs) != {"input_ids", "position_ids"}:
        return None
    pos, ids, trained = positions[0].tolist(), inputs["input_ids"][0].tolist(), (labels[0] != IGNORE_INDEX).tolist()
    starts = [t for t, p in enumerate(pos) if p == 0]
    if len(starts) < 2 or starts[0] != 0:
        return None
    rows, limit = list(zip(starts, starts[1:] + [len(pos)])), len(pos)
    for a, b in rows:
        if pos[a:b] != list(range(b - a)):
            return None  # runs that already continue one another
        first_label = next((t for t in range(a, b) if trained[t]), b)
        limit = min(limit, first_label - a - 1)  # the token after the prefix unlabelled
    shared = min(limit, common_prefix_length([ids[a:b] for a, b in rows]))
    if shared == 0:
        return None
    keep = torch.ones(positions.size(1), dtype=torch.bool, device=positions.device)
    for a in starts[1:]:
        keep[a : a + shared] = False
    return {name: value[:, keep] for name, value in inputs.items()}, labels[:, keep]


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
