"""Batched, KV-cached generation with transformers' ``generate``.

Prompts are rendered text (from ``polmctl.data.format_prompt``) and are tokenized exactly
as training tokenizes them (no added special tokens), left-padded so that every row's
new tokens start at the same position.
"""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
    """Completions for ``prompts`` (decoded without special tokens), in order."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(p for p in model.parameters()).device
    outputs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
