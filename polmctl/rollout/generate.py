"""Batched, KV-cached generation with transformers' ``generate``.

Prompts are rendered text (from ``polmctl.data.format_prompt``) and are tokenized exactly
as training tokenizes them (no added special tokens), left-padded so that every row's
new tokens start at the same position.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _prefix_tuned(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return getattr(getattr(config, "peft_type", None), "value", None) == "PREFIX_TUNING"


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             decode: bool = True) -> list[str] | list[list[int]]:
    """Completions for ``prompts``, in order: text without special tokens, or (``decode=False``)
    the new token ids up to and including the end-of-sequence token."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(p for p in model.parameters()).device
    outputs: list = []
    # peft 0.21 hands prefix-tuning prefixes to the model as `past_key_values`, which
    # transformers 5 ignores once generate has made its own `cache`: the prefix would be
    # silently dropped. Without a KV cache the prefix is used at every step (slower, right).
    use_cache = not _prefix_tuned(model)
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=use_cache, **sampling)
            new = out[:, enc["input_ids"].shape[1]:]
            if decode:
                outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
            else:
                outputs.extend([t for t in row.tolist() if t != tokenizer.pad_token_id] for row in new)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
