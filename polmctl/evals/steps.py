"""Held-out evaluations of step-level training: a process reward model's step and first-error
accuracy (task ``prm``), and how often a policy prefers the correct next step over the first
wrong one (task ``step_preference``, for Step-DPO).

    polmctl eval outputs/prm/2026-12-03/10-00-00                        # builtin:arithmetic_steps, test split
    polmctl eval outputs/step_dpo/2026-12-03/10-00-00 eval.tasks=[step_preference]

``prm``: a step is predicted right when its score (P(correct)) is above 0.5. Step accuracy is
over all labelled steps; first-error accuracy is over solutions: the predicted first error (the
first step predicted wrong, or none) must be the labelled one (the first step labelled false, or
none for a correct solution), as ProcessBench scores it.

``step_preference``: the length-normalised log-probability of the chosen step against the
rejected one after the shared prompt and prefix (the ``preference`` task's measure, on steps).
"""

from __future__ import annotations

from typing import Any

import torch

from polmctl.data.preference import preference_collate
from polmctl.data.steps import encode_step_pairs, encode_step_rows
from polmctl.evals.preference import pair_metrics
from polmctl.losses import IGNORE_INDEX
from polmctl.models.forward import sequence_logps
from polmctl.rollout.process_reward import score_steps, step_separator_of


def first_error(right: list[bool]) -> int | None:
    """The index of the first step that is not right; None when every step is."""
    return next((i for i, ok in enumerate(right) if not ok), None)


def prm_accuracy(model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int = 512) -> dict[str, Any]:
    examples, _ = encode_step_rows(
        rows, tokenizer, source="prm eval", separator=step_separator_of(model), max_length=max_length
    )
    ends = [[i for i, label in enumerate(e["labels"]) if label != IGNORE_INDEX] for e in examples]
    scores = score_steps(model, [e["input_ids"] for e in examples], ends, tokenizer.pad_token_id, batch_size)
    steps = first_errors = 0
    samples = []
    for e, end, row_scores in zip(examples, ends, scores):
        labels = [e["labels"][i] == 1 for i in end]
        predicted = [s > 0.5 for s in row_scores]
        steps += sum(p == label for p, label in zip(predicted, labels))
        first_errors += first_error(predicted) == first_error(labels)
        samples.append(
            {
                "prompt": rows[e["row"]]["prompt"],
                "steps": rows[e["row"]]["completions"][: len(labels)],
                "labels": labels,
                "scores": row_scores,
                "first_error": first_error(labels),
                "predicted_first_error": first_error(predicted),
            }
        )
    total_steps = sum(len(end) for end in ends)
    metrics = {"step_accuracy": steps / total_steps, "first_error_accuracy": first_errors / len(examples)}
    return {"metrics": {**metrics, "n": len(examples), "steps": total_steps}, "samples": samples}


@torch.no_grad()
def step_preference_accuracy(
    model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int = 512
) -> dict[str, Any]:
    examples, _ = encode_step_pairs(rows, tokenizer, source="step_preference eval", max_length=max_length)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = preference_collate(examples[i : i + batch_size], tokenizer.pad_token_id)
            logps, lengths = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
            average = (logps / lengths.clamp(min=1)).tolist()
            half = len(average) // 2
            scores += zip(average[:half], average[half:])
    finally:
        model.train(was_training)
    return {"metrics": pair_metrics(scores), "samples": []}
