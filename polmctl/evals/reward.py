"""Held-out pairwise accuracy of a reward model: how often it scores the chosen answer above
the rejected one, on builtin:style_preference's test split by default.

    polmctl eval outputs/reward_model/2026-11-25/10-00-00
    polmctl eval outputs/reward_model/2026-11-25/10-00-00 eval.source=builtin:arithmetic_preference
"""

from __future__ import annotations

from typing import Any

import torch

from polmctl.data.preference import encode_preference_dataset, preference_collate
from polmctl.objectives.reward import pair_scores


@torch.no_grad()
def reward_accuracy(model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int = 512) -> dict[str, Any]:
    examples, _ = encode_preference_dataset(rows, tokenizer, source="reward eval", max_length=max_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in preference_collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()}
        chosen, rejected = pair_scores(model, batch)
        samples += [{"chosen_score": c, "rejected_score": r} for c, r in zip(chosen.tolist(), rejected.tolist())]
    model.train(was_training)
    margins = [s["chosen_score"] - s["rejected_score"] for s in samples]
    return {"metrics": {"accuracy": sum(m > 0 for m in margins) / len(margins),
                        "mean_margin": sum(margins) / len(margins), "n": len(margins)},
            "samples": samples}
