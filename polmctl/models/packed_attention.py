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

bf16 on CPU: PyTorch's flash-attention kernel for CPU runs its bf16 backward pass 2-3x slower
than its float32 one below ~200 keys (SmolLM2's shapes, torch 2.13: 1.5 ms against 0.6 ms
forward + backward at 64 keys, 3.1 against 1.7 at 128; faster from ~250 keys on), which made
attention the largest cost of a bf16 LoRA step. So where gradients flow and the keys are few,
``_sdpa`` runs attention in float32 and casts the result back; inference (reference log-probs,
generation) keeps the bf16 kernel, which is faster in its forward pass at every length. A bf16
model on CPU is switched to this attention at load (models/load.py) for padded batches too.
"""

from __future__ import annotations

import torch

from polmctl.losses import IGNORE_INDEX

NAME = "polmctl_packed_sdpa"
# Up to this many keys, attention with gradients on a bf16/fp16 CPU model runs in float32 (see above).
CPU_FLOAT32_MAX_KEYS = 192


def _in_float32(query: torch.Tensor, keys: int) -> bool:
    """Whether attention over ``keys`` keys runs in float32 (see the module docstring)."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and query.requires_grad
        and keys <= CPU_FLOAT32_MAX_KEYS
    )


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' ``sdpa_attention_forward``, in float32 for a short attention with gradients
    on a low-precision CPU model."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _in_float32(query, key.size(2)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # a full fine-tune's forward runs under autocast
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(query.dtype), weights


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
    positions = kwargs.get("position_ids")
    packed = (
        positions is not None
        and query.size(0) == 1
        and query.size(2) == key.size(2)
        and positions.size(-1) == query.size(2)
    )
    runs = _runs(positions) if packed else []
    if len(runs) <= 1:  # not packed, or one row only
        return _sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    dtype = query.dtype
    if not _in_float32(query, max(first + b - a for a, b, first in runs)):
        return _packed_rows(module, query, key, value, runs, dropout=dropout, scaling=scaling), None
    with torch.autocast(query.device.type, enabled=False):  # the pack cast once, not row by row
        out = _packed_rows(module, query.float(), key.float(), value.float(), runs, dropout=dropout, scaling=scaling)
    return out.to(dtype), None


def _packed_rows(module, query, key, value, runs: list[tuple[int, int, int]], **kwargs) -> torch.Tensor:
    """Attention over each run of a pack: causal over a row of its own, or over the prefix it
    continues then itself; [1, T, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # One split per tensor, not a slice per run: a slice's backward writes its gradient into a
    # zeroed tensor of the whole pack's size, once per run and layer (fill, copy and add over
    # runs x T); the split's backward concatenates the pieces' gradients once.
    sizes = [b - a for a, b, _ in runs]
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    rows, root = [], None
    for i, (_, _, first) in enumerate(runs):
        if first == 0:  # a row of its own: causal over itself
            root = i
            rows.append(
                sdpa_attention_forward(module, queries[i], keys[i], values[i], None, is_causal=True, **kwargs)[0]
            )
            continue
        root_tokens = 0 if root is None else sizes[root]
        if first > root_tokens:  # (also a pack whose first run does not start at 0)
            raise ValueError(
                f"packed_sdpa: a packed run starts at position {first}, but the row it would continue "
                f"has {root_tokens} tokens; position_ids must restart at 0 for each row "
                "(data/collate.py pack_collate) or continue a shared prefix (share_common_prefix)"
            )
        # A continuation of a shared prefix: the row's first `first` tokens, then itself, causally.
        seen_keys = torch.cat([keys[root][:, :, :first], keys[i]], dim=2)
        seen_values = torch.cat([values[root][:, :, :first], values[i]], dim=2)
        visible = torch.ones(sizes[i], first + sizes[i], dtype=torch.bool, device=query.device).tril(diagonal=first)
        rows.append(
            sdpa_attention_forward(
                module, queries[i], seen_keys, seen_values, visible[None, None], is_causal=False, **kwargs
            )[0]
        )
    return torch.cat(rows, dim=1)


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
