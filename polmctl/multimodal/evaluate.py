"""Exact-match answer accuracy of a vision-language model on held-out picture questions.

    polmctl run recipe=vlm_adapter                                        # before and after training
    polmctl eval outputs/vlm_adapter/<date>/<time>                         # a finished run's final/

Greedy generation through ``LlavaProcessor`` (left-padded prompts + pixel values) and
``LlavaForConditionalGeneration.generate``; the completion's answer, lower-cased, must equal
the row's ``answer``: the first of the row's ``choices`` it names (builtin:shapes rows list
every colour or every shape kind), else its first word. Rows with ``choices`` also give the
chance level: the mean of 1 / len(choices).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from polmctl.data import format_prompt
from polmctl.multimodal.data import load_image, with_image_token

WORD = re.compile(r"[a-z0-9]+")


def predicted_answer(text: str, choices: list[str] | None = None) -> str:
    """The first of ``choices`` the completion names ("The circle is red." -> "red"), else its first word."""
    words = WORD.findall(text.lower())
    named = [w for w in words if choices and w in {c.lower() for c in choices}]
    return named[0] if named else (words[0] if words else "")


@torch.no_grad()
def answer_accuracy(model, processor, rows: list[dict], *, batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    samples = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            prompts = [format_prompt(with_image_token(r["prompt"], processor.image_token), tokenizer) for r in chunk]
            images = [load_image(r["image"], f"eval row {i + k}") for k, r in enumerate(chunk)]
            enc = processor(
                images=images, text=prompts, padding=True, return_tensors="pt", add_special_tokens=False
            ).to(device)
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            width = enc["input_ids"].shape[1]
            for row, completion in zip(chunk, tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)):
                predicted, answer = predicted_answer(completion, row.get("choices")), str(row["answer"]).strip().lower()
                samples.append(
                    {
                        "prompt": row["prompt"],
                        "completion": completion,
                        "predicted": predicted,
                        "answer": answer,
                        "correct": predicted == answer,
                    }
                )
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    metrics: dict[str, Any] = {"accuracy": sum(s["correct"] for s in samples) / len(samples), "n": len(samples)}
    if all(r.get("choices") for r in rows):
        metrics["chance"] = sum(1 / len(r["choices"]) for r in rows) / len(rows)
    return {"metrics": metrics, "samples": samples}
