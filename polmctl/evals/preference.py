"""Held-out preference accuracy: how often the model gives the chosen answer a higher
length-normalised log-probability than the rejected one (the reference-free implicit
reward of SimPO), on builtin:arithmetic_preference's test split by default.

    polmctl eval outputs/dpo/2026-11-24/10-00-00 eval.tasks=[preference]
"""

from __future__ import annotations

from typing import Any

import torch

from polmctl.data.preference import encode_preference_dataset, preference_collate
from polmctl.objectives.pairwise import sequence_logps


@torch.no_grad()
def preference_accuracy(model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int = 512) -> dict[str, Any]:
    examples, _ = encode_preference_dataset(rows, tokenizer, source="preference eval", max_length=max_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins, margins = [], []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in preference_collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()}
        logps, lengths = sequence_logps(model, batch)
        avg = logps / lengths.clamp(min=1)
        half = avg.size(0) // 2
        margin = avg[:half] - avg[half:]
        wins += (margin > 0).tolist()
        margins += margin.tolist()
    model.train(was_training)
    return {"metrics": {"accuracy": sum(wins) / len(wins), "mean_margin": sum(margins) / len(margins), "n": len(wins)},
            "samples": []}
