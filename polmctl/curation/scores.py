"""Scores of (instruction, answer) rows: instruction-following difficulty and a reward model's score.

    polmctl data filter rows.jsonl --out kept.jsonl --model builtin:smollm2-135m --ifd-max 1 --ifd-top 0.5
    polmctl data filter rows.jsonl --out kept.jsonl --reward-model outputs/reward_model/... --min-reward 0

IFD (Li et al. 2024, "From Quantity to Quality", the Cherry-LLM score) = s(A | Q) / s(A): the model's
mean cross-entropy on the answer's tokens after the instruction, divided by the same after no
instruction. Near 0: the instruction makes the answer easy; at or above 1: the instruction does not
help (the paper drops those as misaligned pairs); among the rest, a higher IFD is a harder, more
informative row. Both losses score the same answer tokens, rendered as training renders them
(format_prompt / format_completion); "no instruction" is the prompt render of an empty instruction
(a chat template's system prompt and empty user turn), or the tokenizer's bos/eos token without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polmctl.data import format_completion, format_prompt, pad_collate
from polmctl.losses import IGNORE_INDEX
from polmctl.models.forward import labelled_logits


@dataclass(frozen=True)
class IFDScore:
    conditioned: float  # mean NLL of the answer after the instruction
    direct: float  # mean NLL of the answer after no instruction
    answer_tokens: int

    @property
    def ifd(self) -> float:
        return self.conditioned / self.direct if self.direct > 0 else float("inf")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _empty_context(tokenizer) -> list[int]:
    ids = _ids(tokenizer, format_prompt("", tokenizer))
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start]


@torch.no_grad()
def _mean_answer_nll(model, examples: list[dict], pad_token_id: int, batch_size: int) -> list[float]:
    """Per example: mean NLL of its labelled tokens (each predicted from the tokens before it); the
    LM head runs only where a labelled token is predicted."""
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_collate(examples[i : i + batch_size], pad_token_id).items()}
        labels = batch.pop("labels")
        scored = labelled_logits(model, batch, labels)
        token_nll = torch.nn.functional.cross_entropy(scored.logits.float(), scored.targets, reduction="none")
        nll = scored.on_window(token_nll)
        out += (nll.sum(-1) / scored.mask.sum(-1).clamp(min=1)).tolist()
    return out


def ifd_scores(
    model, tokenizer, pairs: list[tuple[Any, str]], *, batch_size: int = 8, max_length: int = 1024
) -> list[IFDScore]:
    """The IFD of each (instruction, answer). The answer keeps at most half of ``max_length``
    tokens and the instruction the last ones that fit beside it (both losses see the same answer)."""
    empty = _empty_context(tokenizer)
    conditioned, direct, lengths = [], [], []
    for instruction, answer in pairs:
        prompt = _ids(tokenizer, format_prompt(instruction, tokenizer))
        completion = _ids(tokenizer, format_completion(instruction, answer, tokenizer))[: max_length // 2]
        prompt = prompt[-(max_length - len(completion)) :] or empty
        context = empty[-(max_length - len(completion)) :]
        conditioned.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
        direct.append({"input_ids": context + completion, "labels": [IGNORE_INDEX] * len(context) + completion})
        lengths.append(len(completion))
    was_training = model.training
    model.eval()
    try:
        cond = _mean_answer_nll(model, conditioned, tokenizer.pad_token_id, batch_size)
        dire = _mean_answer_nll(model, direct, tokenizer.pad_token_id, batch_size)
    finally:
        model.train(was_training)
    return [IFDScore(c, d, n) for c, d, n in zip(cond, dire, lengths)]


def reward_scores(path: str, pairs: list[tuple[Any, str]], *, device: str = "cpu", batch_size: int = 8) -> list[float]:
    """A reward model's (a recipe=reward_model run dir or its final/) score of each (prompt, answer)."""
    from polmctl.rollout.rewards import RewardModelScorer

    scorer = RewardModelScorer(path, device=device, batch_size=batch_size)
    return scorer([p for p, _ in pairs], [a for _, a in pairs])
