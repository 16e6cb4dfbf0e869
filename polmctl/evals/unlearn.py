"""How much of a forget-set or retain-set a model still knows: greedy answers checked against the
``answer`` column, and the perplexity of the reference answers (rows with a ``role`` column, as
builtin:facts; the unlearn recipe's eval tasks ``forget`` and ``retain``).

    polmctl eval outputs/unlearn/2026-12-03/10-00-00 eval.tasks=[forget,retain]

After unlearning, ``forget`` accuracy should fall and its perplexity rise; ``retain`` should hold.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from polmctl.data import encode_dataset, format_prompt, pad_collate
from polmctl.data.builtin.facts import fact_correct
from polmctl.data.prompts import prompt_of
from polmctl.errors import DataError
from polmctl.losses.sft import shifted_token_nll
from polmctl.rollout import generate


def fact_recall(
    model, tokenizer, rows: list[dict], *, role: str, batch_size: int, max_new_tokens: int
) -> dict[str, Any]:
    """Accuracy (a greedy answer states the ``answer``) and the reference answers' perplexity, on the
    rows whose ``role`` is ``role``."""
    chosen = [r for r in rows if r.get("role") == role]
    if not chosen:
        raise DataError(
            f"eval task {role!r}: none of {len(rows)} held-out rows has role={role!r}; it reads rows with "
            "'role' (forget | retain) and 'answer' columns, as builtin:facts (eval.source, data.eval_split)"
        )
    prompts = [format_prompt(prompt_of(r), tokenizer) for r in chosen]
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    samples = [
        {
            "prompt": prompt_of(r),
            "completion": c,
            "answer": str(r["answer"]),
            "correct": fact_correct(c, str(r["answer"])),
        }
        for r, c in zip(chosen, completions)
    ]
    nll = answer_nll(model, tokenizer, chosen, batch_size=batch_size)
    accuracy = sum(s["correct"] for s in samples) / len(samples)
    return {
        "metrics": {"accuracy": accuracy, "nll": nll, "perplexity": math.exp(nll), "n": len(samples)},
        "samples": samples,
    }


def recall_task(role: str):
    """The runner of eval task ``role`` (forget | retain): ``fact_recall`` on that role's rows."""

    def run(model, tokenizer, rows: list[dict], cfg) -> dict[str, Any]:
        return fact_recall(
            model, tokenizer, rows, role=role, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens
        )

    return run


@torch.no_grad()
def answer_nll(model, tokenizer, rows: list[dict], *, batch_size: int) -> float:
    """Mean next-token NLL over the rows' answer tokens (prompt/completion rows)."""
    examples, _ = encode_dataset(rows, tokenizer, source="unlearning eval", completion_only_loss=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = pad_collate(examples[i : i + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            nll, count = shifted_token_nll(logits, batch["labels"])
            total, tokens = total + nll.item(), tokens + int(count)
    finally:
        model.train(was_training)
    return total / max(tokens, 1)
