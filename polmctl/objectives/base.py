"""What every objective hands the engine, and helpers shared by objectives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

IGNORE_INDEX = -100


@dataclass
class LossTerms:
    """A micro-batch's contribution to one optimizer step.

    The engine divides ``loss_sum`` by the summed ``weight`` of all micro-batches in the
    step (across processes too), so the step's loss is an exact mean over tokens (or
    pairs, or sequences) however the step was split into micro-batches.
    ``metrics`` are sums over the micro-batch, averaged by the engine with the same weight;
    a metric over a subset of the batch (e.g. KTO's desirable rows) is a ``(sum, count)``
    pair instead, and the engine divides the step's summed sums by the summed counts.
    """

    loss_sum: torch.Tensor
    weight: torch.Tensor | int
    metrics: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Objective(Protocol):
    """What the train runner and the engine need from an objective.

    An objective may also define ``prepare(model, examples, *, device, model_id, cache_dir)``,
    called once before training (e.g. to score the data with a reference model).
    """

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        """Rows -> token-id examples and stats with a one-line ``summary()``."""

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]: ...

    def weight(self, batch: dict) -> int:
        """The normaliser of this batch, known before the forward pass."""

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms: ...


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


def token_logps(model: torch.nn.Module, batch: dict, *,
                share_prompts: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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


def policy_forward(model: torch.nn.Module, batch: dict, *, entropy: bool = False, hidden: bool = False,
                   share_prompts: bool = False) -> PolicyForward:
    """``token_logps`` plus, on request, the entropy (a logged metric of online RL) and the
    final hidden states (PPO's value head reads them), from the same forward pass.

    ``share_prompts``: rows that share a prompt run it once (objectives/shared_prompt.py; not
    with ``hidden``). Same values up to float rounding, same layout; GRPO opts in, where G rows
    share each prompt. Offline objectives keep the plain path, which is bit-stable across runs."""
    if share_prompts and not hidden:
        from polmctl.objectives.shared_prompt import shared_prompt_logps

        shared = shared_prompt_logps(model, batch, entropy=entropy)
        if shared is not None:
            logps, mask, ent = shared
            return PolicyForward(logps=logps, mask=mask, entropy=ent)
    keep, labels = logits_window(batch["labels"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                use_cache=False, output_hidden_states=hidden)
    logits = out.logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    normaliser = torch.logsumexp(logits, dim=-1)
    result = PolicyForward(logps=(picked - normaliser) * mask, mask=mask)
    if entropy:
        with torch.no_grad():  # H = logsumexp(z) - sum softmax(z) z
            result.entropy = (normaliser - (logits.softmax(-1) * logits).sum(-1)) * mask
    if hidden:
        # hidden_states[-1] is the final (normed) state; position t predicts token t + 1.
        result.hidden = out.hidden_states[-1][:, -keep:-1]
    return result
