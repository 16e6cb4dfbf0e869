"""Batched generation: transformers' KV-cached ``generate``, or for prompt-learning adapters
a plain decoding loop.

Prompts are rendered text (from ``polmctl.data.format_prompt``) and are tokenized exactly
as training tokenizes them (no added special tokens).

Stop strings end a completion right after the first one it produces (the stop string stays
in the text). Only the completion is searched: a stop string that would need the prompt's
last characters (``"\\n\\n"`` after a chat prompt ending in ``"\\n"``) does not stop it, as in vLLM.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import groupby
from typing import Sequence

import torch

from polmctl.models.forward import is_prompt_learning


def draw_tokens(scores: torch.Tensor) -> torch.Tensor:
    """One token per row of ``scores`` ([B, V] logits, -inf where excluded), drawn from their
    softmax by inverse CDF: one uniform per row against the running sum of the probabilities.

    Written by hand because ``torch.multinomial``, what ``generate``'s sampling calls, draws an
    exponential for every vocabulary entry: on CPU 60+ ms per step for 64 rows of SmolLM2's
    49k vocabulary, a third of a rollout's time, against ~4 ms for the softmax and cumulative
    sum here. Same distribution (tests/rollout/test_generate.py checks the frequencies); a token of
    probability 0 is never drawn (its step of the CDF is flat)."""
    cdf = scores.float().softmax(dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.size(-1) - 1).squeeze(-1)


class _DrawNextToken:
    """The last logits processor of a sampled ``generate``: draws the token (``draw_tokens``) and
    hands generate's greedy step scores that are 0 there and -inf elsewhere, so its argmax
    picks the draw."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = draw_tokens(scores)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


def sampling_warpers(temperature: float, top_p: float, top_k: int) -> list:
    """transformers' own warpers, in the order its sampling applies them; neutral ones left out
    (top-p = 1 would still sort the vocabulary every step)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def decoding_kwargs(do_sample: bool, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> dict:
    """``generate`` keywords for greedy decoding or for sampling at these settings. Sampling runs as
    generate's greedy mode with the warpers and ``_DrawNextToken`` as logits processors: the same
    distribution as ``do_sample=True`` without its per-step ``torch.multinomial``. (generate's
    default top-k of 50 never applies: top_k=0 means the full distribution.)"""
    if not do_sample:
        return {"do_sample": False}
    from transformers import LogitsProcessorList

    return {
        "do_sample": False,
        "logits_processor": LogitsProcessorList(sampling_warpers(temperature, top_p, top_k) + [_DrawNextToken()]),
    }


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    decode: bool = True,
    stop: Sequence[str] = (),
) -> list[str] | list[list[int]]:
    """Completions for ``prompts``, in order: text without special tokens, or (``decode=False``)
    the new token ids up to and including the end-of-sequence token, or up to the end of the
    first stop string in ``stop``."""
    stop = list(stop)
    decoding = decoding_kwargs(do_sample, temperature, top_p, top_k)
    new_tokens: list[list[int]] = []
    with generation_mode(model, tokenizer) as device:
        if is_prompt_learning(model):
            new_tokens = decode_without_cache(
                model,
                tokenizer,
                prompts,
                max_new_tokens,
                batch_size,
                device,
                do_sample,
                temperature,
                top_p,
                stop,
                top_k,
            )
        else:
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(
                    list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                width = enc["input_ids"].shape[1]
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=stop_criteria(tokenizer, stop, width),
                    **decoding,
                )
                new_tokens += [cut_completion(row.tolist(), tokenizer, stop) for row in out[:, width:]]
    if decode:
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return new_tokens


@contextmanager
def generation_mode(model, tokenizer):
    """Eval mode and left padding for the duration; yields the model's device."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield next(p for p in model.parameters()).device
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def _until_eos(tokens: list[int], tokenizer) -> list[int]:
    """The new tokens up to and including the first end-of-sequence token."""
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def cut_completion(tokens: list[int], tokenizer, stop: Sequence[str] = ()) -> list[int]:
    """The new tokens up to and including the end-of-sequence token, or up to and including the
    token that completes the first stop string, whichever comes first; without ``stop``, just
    the first. The text is searched as ``StopStringCriteria`` sees it (special tokens as their
    text), so the cut falls where generation stopped."""
    tokens = _until_eos(tokens, tokenizer)
    if not stop:
        return tokens
    pad = tokenizer.pad_token_id
    while tokens and tokens[-1] == pad and pad != tokenizer.eos_token_id:
        tokens = tokens[:-1]  # a row that stopped early is padded to the batch's length

    def has_stop(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return any(s in text for s in stop)

    if not has_stop(len(tokens)):
        return tokens
    lo, hi = 1, len(tokens)  # the shortest prefix holding a stop string (a longer one holds it too)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
    return tokens[:lo]


class _CompletionStopStrings:
    """transformers' ``StopStringCriteria`` shown only the completion (the columns from
    ``prompt_width`` on), so the prompt's tail never completes a stop string. Passing
    ``stop_strings=`` to ``generate`` would match across the prompt/completion boundary."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int):
        from transformers.generation.stopping_criteria import StopStringCriteria

        self.criteria = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop))
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        return self.criteria(input_ids[:, self.prompt_width :], scores, **kwargs)


def stop_criteria(tokenizer, stop: Sequence[str], prompt_width: int):
    """The ``stopping_criteria`` for ``model.generate`` that end rows at a stop string (None: no stop strings)."""
    if not stop:
        return None
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    return StoppingCriteriaList([_CompletionStopStrings(tokenizer, stop, prompt_width)])


def decode_without_cache(
    model,
    tokenizer,
    prompts,
    max_new_tokens,
    batch_size,
    device,
    do_sample,
    temperature,
    top_p,
    stop: Sequence[str] = (),
    top_k: int = 0,
) -> list[list[int]]:
    """Decoding with a full forward pass per new token, for prompt and prefix tuning.

    Written by hand because ``PeftModel.generate`` is wrong for these adapters with
    peft 0.21.2 + transformers 5.24 (peft still speaks ``past_key_values`` to a generate
    that passes ``cache``): prompt tuning re-injects its soft prompt at every cached step,
    and prefix tuning loses its prefix after the first step, with or without a KV cache
    (tests/models/test_adapters.py keeps strict xfails that fail once that is fixed).
    Prompts are batched only with prompts of the same token length, so no row is padded
    and every position is where training put it. O(length^2) per prompt: slower, right.
    A row ends at the end-of-sequence token or at the end of a stop string in ``stop``.
    """
    warpers = sampling_warpers(temperature, top_p, top_k) if do_sample else []
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: dict[int, list[int]] = {}
    for length, same_length in groupby(order, key=lambda i: len(encoded[i])):
        same_length = list(same_length)
        stopped = _CompletionStopStrings(tokenizer, stop, length) if stop else None
        for start in range(0, len(same_length), batch_size):
            rows = same_length[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in rows], device=device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                scores = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
                for warp in warpers:
                    scores = warp(ids, scores)
                token = draw_tokens(scores) if do_sample else scores.argmax(-1)
                token = token.masked_fill(done, tokenizer.pad_token_id)
                ids = torch.cat([ids, token[:, None]], dim=1)
                done |= token == tokenizer.eos_token_id
                if stopped is not None:
                    done |= stopped(ids)
                if done.all():
                    break
            for row, i in enumerate(rows):
                results[i] = cut_completion(ids[row, length:].tolist(), tokenizer, stop)
    return [results[i] for i in range(len(prompts))]
