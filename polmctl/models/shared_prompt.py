"""One forward pass per distinct prompt of a batch: rows that share a prompt (GRPO's G samples
of it, DPO's chosen and rejected answer) reuse its keys and values, with gradients.

    polmctl run recipe=grpo        # G rows per prompt: the prompt runs once, not G times

    polmctl run recipe=dpo         # chosen and rejected answers: the prompt runs once per pair

``policy_forward(..., share_prompts=True)`` (polmctl/models/forward.py) calls ``shared_prompt_logps``
and falls back to the plain forward where it returns None; GRPO's loss and its old and
reference log-probs ask for it, and so do the pairwise objectives (DPO, IPO, SimPO, ...) for
the policy and the reference. The values equal the plain forward's up to float rounding
(tests/models/test_shared_prompt.py). The distinct prompts, all but their last token,
run through the model into a KV cache (left-padded, positions counted from each prompt's
first token; the tokens all of them open with, a chat template's system prompt, run once before
the rest); the cache is indexed out to one entry per row, and every row then runs only
its last prompt token and its answer on top of it. Autograd follows the indexing, so the
prompt's activations get the summed gradient of all the rows that read them. The result is
laid out exactly as the plain forward's window, so precomputed old or reference log-probs
line up whichever path made them. Written here because transformers shares a prefix only
for generation (no gradient), not for a training forward.
"""

from __future__ import annotations

import torch

from polmctl.losses import IGNORE_INDEX
from polmctl.models.forward import (
    LabelledLogits,
    cache_keyword,
    forward_with_logits_at,
    is_prompt_learning,
    unwrapped,
)
from polmctl.models.packed_attention import common_prefix_length


def _layout(batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(prompt lengths, row lengths) when every row is prompt then answer, right-padded, labels
    on exactly the answer; None for any other batch (packed rows, multi-turn labels, ...)."""
    if "position_ids" in batch or "attention_mask" not in batch:
        return None
    mask, labels = batch["attention_mask"].bool(), batch["labels"]
    trained = labels != IGNORE_INDEX
    if not trained.any(dim=1).all():
        return None
    lengths, starts = mask.sum(dim=1), trained.int().argmax(dim=1)
    positions = torch.arange(mask.size(1), device=mask.device)
    right_padded = torch.equal(mask, positions < lengths[:, None])
    answer_only = torch.equal(trained, (positions >= starts[:, None]) & (positions < lengths[:, None]))
    if not (right_padded and answer_only) or (starts < 2).any():
        return None
    return starts, lengths


def shared_prompt_logps(model: torch.nn.Module, batch: dict, *, entropy: bool = False):
    """``PolicyForward`` fields (logps, mask, entropy) from a shared-prompt forward, or None
    when the batch's rows share no prompt or do not have the prompt-then-answer layout."""
    from transformers import DynamicCache

    layout = _layout(batch)
    if layout is None or is_prompt_learning(model):
        return None
    starts, lengths = (t.tolist() for t in layout)
    ids, labels = batch["input_ids"], batch["labels"]
    owner, prompts = [], {}
    for i, start in enumerate(starts):
        owner.append(prompts.setdefault(tuple(ids[i, : start - 1].tolist()), len(prompts)))
    if len(prompts) == len(starts):
        return None  # nothing to share
    device, pad = ids.device, 0

    # The distinct prompts less their last token, into a cache: the tokens all of them open with
    # (a chat template's system prompt) run once, then the rest of each prompt, left-padded.
    distinct = list(prompts)  # in order of their index
    common = common_prefix_length(distinct) if len(distinct) > 1 else 0
    keyword = cache_keyword(model)
    cache = DynamicCache(config=unwrapped(model).config)  # not a wrapper's (DeepSpeed's engine: its own dict)
    if common:
        model(
            input_ids=ids.new_tensor([distinct[0][:common]]),
            position_ids=torch.arange(common, device=device)[None],
            use_cache=True,
            logits_to_keep=1,
            **{keyword: cache},
        )
        cache.batch_repeat_interleave(len(distinct))
    width = max(len(tokens) - common for tokens in distinct)
    prefill = torch.full((len(distinct), width), pad, dtype=ids.dtype, device=device)
    prefill_mask = torch.zeros((len(distinct), width), dtype=torch.long, device=device)
    for j, tokens in enumerate(distinct):
        rest = tokens[common:]
        prefill[j, width - len(rest) :] = torch.tensor(rest, dtype=ids.dtype, device=device)
        prefill_mask[j, width - len(rest) :] = 1
    positions = common + (prefill_mask.cumsum(-1) - 1).clamp(min=0)
    prefill_mask = torch.cat([prefill_mask.new_ones(len(distinct), common), prefill_mask], dim=1)
    model(
        input_ids=prefill,
        attention_mask=prefill_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{keyword: cache},
    )
    index = torch.tensor(owner, device=device)
    cache.batch_select_indices(index)

    # Each row: its last prompt token, then its answer, on top of its prompt's cache entry.
    rows = len(starts)
    span = max(length - start + 1 for start, length in zip(starts, lengths))
    tail = torch.full((rows, span), pad, dtype=ids.dtype, device=device)
    tail_mask = torch.zeros((rows, span), dtype=torch.long, device=device)
    for i, (start, length) in enumerate(zip(starts, lengths)):
        tail[i, : length - start + 1] = ids[i, start - 1 : length]
        tail_mask[i, : length - start + 1] = 1
    tail_positions = torch.tensor(starts, device=device)[:, None] - 1 + torch.arange(span, device=device)
    targets, real = tail[:, 1:], tail_mask[:, 1:].bool()
    out = forward_with_logits_at(
        model,
        real,
        input_ids=tail,
        position_ids=tail_positions,
        use_cache=True,
        attention_mask=torch.cat([prefill_mask[index], tail_mask], dim=1),
        **{keyword: cache},
    )  # the LM head on answer tokens only
    head = LabelledLogits(logits=out.logits, targets=targets[real], mask=real, output=out)
    logits = head.logits.float()
    picked = logits.gather(-1, head.targets.unsqueeze(-1)).squeeze(-1)
    normaliser = torch.logsumexp(logits, dim=-1)
    logps = head.on_window(picked - normaliser)  # [rows, span - 1] on the tail, zero on padding
    ent = None
    if entropy:
        with torch.no_grad():
            ent = head.on_window(normaliser - (logits.softmax(-1) * logits).sum(-1))

    # Back into the plain forward's window: from one before the batch's first labelled position,
    # shifted by one (position t predicts t + 1). Padding goes to a spare last column, dropped.
    first = max(min(starts) - 1, 0)
    window = labels.size(1) - first - 1
    column = torch.tensor(starts, device=device)[:, None] - first - 1 + torch.arange(span - 1, device=device)
    column = torch.where(real, column, window)

    def place(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(rows, window + 1).scatter(1, column, values)[:, :window]

    mask = labels[:, first:][:, 1:] != IGNORE_INDEX
    return place(logps), mask, None if ent is None else place(ent)
