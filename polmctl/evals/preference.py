"""Held-out preference accuracy: how often the model gives the chosen answer a higher
length-normalised log-probability than the rejected one (the reference-free implicit
reward of SimPO), on builtin:arithmetic_preference's test split by default.

    polmctl eval outputs/dpo/2026-11-24/10-00-00 eval.tasks=[preference]
"""

from __future__ import annotations

from typing import Any

import torch

from polmctl.data.preference import encode_preference_dataset, preference_collate
from polmctl.models.forward import sequence_logps


@torch.no_grad()
def score_pairs(
    model, tokenizer, rows: list[dict], score, *, batch_size: int, max_length: int, source: str
) -> list[tuple[float, float]]:
    """``(chosen, rejected)`` scores of every pair, ``score(model, batch)`` giving both halves of
    a chosen-then-rejected batch; the model is scored in eval mode and left as it was."""
    examples, _ = encode_preference_dataset(rows, tokenizer, source=source, max_length=max_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = preference_collate(examples[i : i + batch_size], tokenizer.pad_token_id)
            chosen, rejected = score(model, {k: v.to(device) for k, v in batch.items()})
            scores += zip(chosen.tolist(), rejected.tolist())
    finally:
        model.train(was_training)
    return scores


def pair_metrics(scores: list[tuple[float, float]]) -> dict[str, Any]:
    margins = [c - r for c, r in scores]
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "n": len(margins),
    }


def _average_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logps, lengths = sequence_logps(model, batch)
    avg = logps / lengths.clamp(min=1)
    half = avg.size(0) // 2
    return avg[:half], avg[half:]


def preference_accuracy(
    model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int = 512
) -> dict[str, Any]:
    scores = score_pairs(
        model, tokenizer, rows, _average_logps, batch_size=batch_size, max_length=max_length, source="preference eval"
    )
    return {"metrics": pair_metrics(scores), "samples": []}
