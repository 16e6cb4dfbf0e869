"""Exact-match accuracy on held-out rows with an ``answer`` column (builtin:arithmetic's
test split by default), with batched greedy generation.

    polmctl eval outputs/lora/2026-11-24/10-00-00 eval.tasks=[arithmetic] eval.max_samples=200
"""

from __future__ import annotations

from typing import Any, Callable

from polmctl.data import extract_answer, format_prompt
from polmctl.data.prompts import prompt_of
from polmctl.rollout import generate


def exact_match(
    model,
    tokenizer,
    rows: list[dict],
    *,
    batch_size: int,
    max_new_tokens: int,
    extract: Callable[[str], str | None] = extract_answer,
) -> dict[str, Any]:
    prompts = [format_prompt(prompt_of(r), tokenizer) for r in rows]
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    samples = []
    for row, completion in zip(rows, completions):
        predicted = extract(completion)
        samples.append(
            {
                "prompt": prompt_of(row),
                "completion": completion,
                "predicted": predicted,
                "answer": str(row["answer"]),
                "correct": predicted == str(row["answer"]),
            }
        )
    accuracy = sum(s["correct"] for s in samples) / len(samples)
    return {"metrics": {"accuracy": accuracy, "n": len(samples)}, "samples": samples}
