"""Perplexity on held-out text: exp of the mean next-token NLL over every token
(builtin:domain_text's test split by default).

    polmctl eval outputs/continued_pretraining/... eval.tasks=[perplexity]
"""

from __future__ import annotations

import math
from typing import Any

import torch

from polmctl.data import encode_dataset, pad_collate
from polmctl.losses.sft import shifted_token_nll


@torch.no_grad()
def perplexity(model, tokenizer, rows: list[dict], *, batch_size: int, max_length: int = 512) -> dict[str, Any]:
    examples, _ = encode_dataset(
        rows,
        tokenizer,
        source="perplexity eval",
        max_length=max_length,
        completion_only_loss=False,
        overlong="truncate",
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = pad_collate(examples[i : i + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll, count = shifted_token_nll(logits, batch["labels"])
        total_nll += nll.item()
        total_tokens += int(count)
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return {"metrics": {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}, "samples": []}
