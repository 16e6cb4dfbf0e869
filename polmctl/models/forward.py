"""Forward passes several methods share: logits only where a label is predicted, token and
sequence log-probs, entropy, final hidden states, reward-model scores.

    polmctl run recipe=sft | dpo | grpo | ppo | distill      (every training method runs through these)

The LM head is the largest activation of a small model (49k columns on SmolLM2), so it runs
only on the hidden states that predict a trained token (``head_only_at``); rows that share a
prompt run it once (polmctl/models/shared_prompt.py); a packed batch runs row by row
(polmctl/models/packed_attention.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from polmctl.losses import IGNORE_INDEX


def logits_window(labels: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many trailing positions need logits, and the labels cut to that window.

    Hidden states at prompt positions never need the LM head: with a 49k vocabulary the
    head is the largest activation of a small model, so computing logits only from the
    first trained position on saves memory and time. The window keeps one extra position
    before the first label because logits[t] predicts labels[t + 1].
    """
    trained = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if trained.numel() == 0:
        return 1, labels[:, -1:]
    start = max(int(trained[0]) - 1, 0)
    return labels.size(1) - start, labels[:, start:]


@dataclass
class LabelledLogits:
    """The logits of one forward pass where they predict a labelled token, and nowhere else."""

    logits: torch.Tensor  # [n, V]: row-major over the n labelled positions of ``mask``
    targets: torch.Tensor  # [n]: the token each of those logits predicts
    mask: torch.Tensor  # [B, T], shifted by one: True where a label is predicted (logits_window's window, or a tail)
    output: Any  # the model's output (hidden states, cache) with ``logits`` replaced by the [n, V] ones

    def on_window(self, values: torch.Tensor) -> torch.Tensor:
        """[n] values (one per labelled position) -> [B, T] on the window, zero elsewhere."""
        return values.new_zeros(self.mask.shape).masked_scatter(self.mask, values)


@contextmanager
def head_only_at(model: torch.nn.Module, select: torch.Tensor):
    """Run the model's LM head only on the hidden states where ``select`` ([B, T], matching the
    [B, T, H] states the head receives) is True; the model's logits come out [n, V].

    transformers' ``logits_to_keep`` cuts positions from the end only, the same for every row:
    rows padded or with prompts of different lengths still send padding and prompt positions
    through the head (49k columns on SmolLM2, and a non-contiguous slice that runs as a batched
    matmul). A pre-hook on the output embedding picks exactly the labelled positions instead,
    and works for every model that calls its head as a module, whatever it does after the head
    (logit scaling, soft-capping). Yields False, changing nothing, where the model has no such head.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield False
        return

    def cut(module, args):
        hidden = args[0]
        if hidden.shape[:-1] != select.shape:
            raise RuntimeError(
                f"head_only_at: the LM head got hidden states {tuple(hidden.shape)}, "
                f"but the selection is {tuple(select.shape)}"
            )
        return (hidden[select],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(cut)
    try:
        yield True
    finally:
        handle.remove()


def forward_with_logits_at(model: torch.nn.Module, predicts: torch.Tensor, **forward) -> Any:
    """``model(**forward)`` with its logits only where ``predicts`` ([B, T - 1] over the T input
    positions: True where token t + 1 is scored) is True: ``output.logits`` is [n, V], row-major.
    The head runs on those positions only (``head_only_at``), or, for a model without a head
    module, the full logits are cut after the forward."""
    with head_only_at(model, F.pad(predicts, (0, 1))) as cut:  # the last position predicts nothing
        out = model(**forward)
    out.logits = out.logits if cut else out.logits[:, :-1][predicts]
    return out


def labelled_logits(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, **model_kwargs) -> LabelledLogits:
    """One forward pass whose LM head runs only where a labelled token is predicted.

    ``labels`` are [B, S] with -100 where nothing is trained; the window and its shift are
    ``logits_window``'s, so values placed with ``on_window`` line up with every other forward.
    A packed batch runs row by row, the prefix its rows share once (models/packed_attention.py);
    its logits and targets are the same, in the same order, but ``output`` is the shared pack's."""
    run_inputs, run_labels = inputs, labels
    if "position_ids" in inputs and "attention_mask" not in inputs:  # a padding-free packed batch
        from polmctl.models.packed_attention import share_common_prefix, use_packed_attention

        # each packed row attends to itself alone (and to the prefix it shares), at its own length
        if use_packed_attention(model) and not model_kwargs.get("output_hidden_states"):
            run_inputs, run_labels = share_common_prefix(inputs, labels) or (inputs, labels)
    keep, window = logits_window(run_labels)
    predicts = window[:, 1:] != IGNORE_INDEX
    out = forward_with_logits_at(model, predicts, **run_inputs, logits_to_keep=keep, use_cache=False, **model_kwargs)
    if run_labels is not labels:  # the shared pack: same targets in the same order, on the caller's layout
        _, window = logits_window(labels)
    targets = window[:, 1:]
    mask = targets != IGNORE_INDEX
    return LabelledLogits(logits=out.logits, targets=targets[mask], mask=mask, output=out)


def token_logps(
    model: torch.nn.Module, batch: dict, *, share_prompts: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each labelled token ([B, T]: the window from the batch's first labelled
    position on) and the mask of labelled tokens. Gathered with a logsumexp, never a full
    log-softmax; the same batch always gives the same window, so precomputed old or
    reference log-probs line up with these. ``share_prompts``: see ``policy_forward``."""
    out = policy_forward(model, batch, share_prompts=share_prompts)
    return out.logps, out.mask


@dataclass
class PolicyForward:
    """One forward pass of a policy over its labelled tokens, all [B, T] on token_logps' window."""

    logps: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None  # per-token entropy of the next-token distribution, no gradient
    hidden: torch.Tensor | None = None  # [B, T, H] final hidden state where each labelled token is predicted


def policy_forward(
    model: torch.nn.Module, batch: dict, *, entropy: bool = False, hidden: bool = False, share_prompts: bool = False
) -> PolicyForward:
    """``token_logps`` plus, on request, the entropy (a logged metric of online RL) and the
    final hidden states (PPO's value head reads them), from the same forward pass.

    ``share_prompts``: rows that share a prompt run it once (polmctl/models/shared_prompt.py; not
    with ``hidden``). Same values up to float rounding, same layout; GRPO (G rows per prompt) and
    the pairwise objectives (chosen and rejected rows) opt in. Either way the LM head runs only
    where a labelled token is predicted (``head_only_at``)."""
    if share_prompts and not hidden:
        from polmctl.models.shared_prompt import shared_prompt_logps

        shared = shared_prompt_logps(model, batch, entropy=entropy)
        if shared is not None:
            logps, mask, ent = shared
            return PolicyForward(logps=logps, mask=mask, entropy=ent)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    head = labelled_logits(model, inputs, batch["labels"], output_hidden_states=hidden)
    logits = head.logits.float()
    normaliser = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, head.targets.unsqueeze(-1)).squeeze(-1)
    result = PolicyForward(logps=head.on_window(picked - normaliser), mask=head.mask)
    if entropy:
        with torch.no_grad():  # H = logsumexp(z) - sum softmax(z) z
            result.entropy = head.on_window(normaliser - (logits.softmax(-1) * logits).sum(-1))
    if hidden:
        # hidden_states[-1] is the final (normed) state; position t predicts token t + 1.
        keep = head.mask.size(1) + 1
        result.hidden = head.output.hidden_states[-1][:, -keep:-1]
    return result


def sequence_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's labelled tokens, and how many there are. Rows that share a
    prompt (a pair's chosen and rejected answers) run it once."""
    logps, mask = token_logps(model, batch, share_prompts=True)
    return (logps * mask).sum(-1), mask.sum(-1)


def pair_scores(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward model's scalar scores of the first half (chosen) and second half (rejected) rows; the
    model's own pooling (the last non-pad token of each row) picks the position."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    scores = scores[:, 0].float()
    half = scores.size(0) // 2
    return scores[:half], scores[half:]


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a distributed wrapper (DDP, DeepSpeed's engine; accelerate's own unwrapping),
    for the model's own attributes: DeepSpeed's engine answers ``config`` with DeepSpeed's config
    dict, and both wrappers' ``forward`` hide the model's signature. Forward passes that train still
    go through the wrapper (DDP's gradient reduction)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def cache_keyword(model: torch.nn.Module) -> str:
    """The name of the KV-cache argument of the model's forward: transformers 5.x renamed
    past_key_values to cache (5.24 accepts both, warning on the old name)."""
    import inspect

    model = unwrapped(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """A peft prompt or prefix tuning model: virtual tokens precede every input, so a KV cache or a
    shared prompt would not line up with the positions it expects."""
    config = getattr(unwrapped(model), "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))
