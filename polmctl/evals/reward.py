"""Held-out pairwise accuracy of a reward model: how often it scores the chosen answer above
the rejected one, on builtin:style_preference's test split by default.

    polmctl eval outputs/reward_model/2026-11-25/10-00-00
    polmctl eval outputs/reward_model/2026-11-25/10-00-00 eval.source=builtin:arithmetic_preference
"""

from __future__ import annotations

from typing import Any

from polmctl.evals.preference import pair_metrics, score_pairs
from polmctl.models.forward import pair_scores


def reward_accuracy(model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int = 512) -> dict[str, Any]:
    scores = score_pairs(
        model, tokenizer, rows, pair_scores, batch_size=batch_size, max_length=max_length, source="reward eval"
    )
    return {"metrics": pair_metrics(scores), "samples": [{"chosen_score": c, "rejected_score": r} for c, r in scores]}
