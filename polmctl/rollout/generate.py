"""Batched generation: transformers' KV-cached ``generate``, or for prompt-learning adapters
a plain decoding loop.

Prompts are rendered text (from ``polmctl.data.format_prompt``) and are tokenized exactly
as training tokenizes them (no added special tokens).
"""

from __future__ import annotations

from itertools import groupby
from typing import Sequence

import torch


def _prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


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
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    new_tokens: list[list[int]] = []
    try:
        if _prompt_learning(model):
            new_tokens = _decode_without_cache(model, tokenizer, prompts, max_new_tokens, batch_size, device,
                                               do_sample, temperature, top_p)
        else:
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
                new_tokens += [_until_eos(row.tolist(), tokenizer) for row in out[:, enc["input_ids"].shape[1]:]]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    if decode:
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return new_tokens


def _until_eos(tokens: list[int], tokenizer) -> list[int]:
    """The new tokens up to and including the first end-of-sequence token."""
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _decode_without_cache(model, tokenizer, prompts, max_new_tokens, batch_size, device, do_sample, temperature,
                          top_p) -> list[list[int]]:
    """Decoding with a full forward pass per new token, for prompt and prefix tuning.

    Written by hand because ``PeftModel.generate`` is wrong for these adapters with
    peft 0.21.2 + transformers 5.24 (peft still speaks ``past_key_values`` to a generate
    that passes ``cache``): prompt tuning re-injects its soft prompt at every cached step,
    and prefix tuning loses its prefix after the first step, with or without a KV cache
    (tests/unit/test_models_adapters.py keeps strict xfails that fail once that is fixed).
    Prompts are batched only with prompts of the same token length, so no row is padded
    and every position is where training put it. O(length^2) per prompt: slower, right.
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)] if do_sample else []
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: dict[int, list[int]] = {}
    for _, same_length in groupby(order, key=lambda i: len(encoded[i])):
        same_length = list(same_length)
        for start in range(0, len(same_length), batch_size):
            rows = same_length[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in rows], device=device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                scores = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
                for warp in warpers:
                    scores = warp(ids, scores)
                token = torch.multinomial(scores.softmax(-1), 1)[:, 0] if do_sample else scores.argmax(-1)
                token = token.masked_fill(done, tokenizer.pad_token_id)
                ids = torch.cat([ids, token[:, None]], dim=1)
                done |= token == tokenizer.eos_token_id
                if done.all():
                    break
            for row, i in enumerate(rows):
                results[i] = _until_eos(ids[row, len(encoded[i]):].tolist(), tokenizer)
    return [results[i] for i in range(len(prompts))]
