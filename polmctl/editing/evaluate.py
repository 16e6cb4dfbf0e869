"""The editing literature's measures of an edit (CounterFact's, Meng et al. 2022), before and after:

  efficacy        on the edited prompt: how often target_new is more likely than the old answer
                  (mean log-prob per token, as the reference evaluation compares), the mean
                  probability of each, and greedy exact match of target_new
  generalisation  the same on paraphrases of the prompt
  specificity     on neighbours (other subjects' prompts): how often their own answer stays more
                  likely than target_new, greedy exact match of their answer, and how far their
                  next-token distribution moved (KL, largest probability change)

Fluency (perplexity on held-out text) is measured by the runner with polmctl.evals.perplexity.

    polmctl run recipe=edit      (the caller: polmctl/runners/edit.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from polmctl.editing.hooks import device_of, padded
from polmctl.editing.requests import EditRequest, target_ids


@dataclass(frozen=True)
class TargetScore:
    logprob: float  # summed log-prob of the target's tokens after the prompt
    mean_logprob: float  # per token
    greedy: bool  # every target token is the argmax after the prompt and the target tokens before it
    tokens: int


@torch.no_grad()
def score_targets(model, tokenizer, items: list[tuple[str, str]], *, batch_size: int = 16) -> list[TargetScore]:
    """How likely each target is after its prompt, teacher-forced in one forward pass. ``greedy``
    is what greedy decoding of as many tokens would give: the target exactly."""
    seqs, spans = [], []
    for prompt, target in items:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = target_ids(tokenizer, prompt, target)
        seqs.append(p + t)
        spans.append((len(p), len(t)))
    device = device_of(model)
    scores = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        logits = model(**padded(chunk, tokenizer.pad_token_id, device), use_cache=False).logits.float()
        logps = logits.log_softmax(-1)
        for row, seq in enumerate(chunk):
            start, n = spans[i + row]
            window = logps[row, start - 1 : start - 1 + n]
            ids = torch.tensor(seq[start : start + n], device=device)
            lp = window.gather(-1, ids[:, None]).squeeze(-1)
            greedy = bool((window.argmax(-1) == ids).all())
            scores.append(TargetScore(float(lp.sum()), float(lp.mean()), greedy, n))
    return scores


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str], *, batch_size: int = 16) -> torch.Tensor:
    """[len(prompts), vocab] log-probs of the token after each prompt (on the CPU, float32)."""
    device = device_of(model)
    seqs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        logits = model(**padded(chunk, tokenizer.pad_token_id, device), use_cache=False).logits
        last = torch.tensor([len(s) - 1 for s in chunk], device=device)
        out.append(logits[torch.arange(len(chunk), device=device), last].float().log_softmax(-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def greedy_answers(model, tokenizer, requests: list[EditRequest]) -> list[str | None]:
    """The model's own answer to each prompt (greedy, as many tokens as target_new has): the old
    answer of a request without target_true. None where it answers nothing."""
    from polmctl.rollout import generate

    answers: list[str | None] = []
    for r in requests:
        n = len(target_ids(tokenizer, r.text, r.target_new))
        ids = generate(model, tokenizer, [r.text], max_new_tokens=n, batch_size=1, decode=False)[0]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        answers.append(text or None)
    return answers


def _pairs(prompts: list[str], first: str, second: str | None) -> list[tuple[str, str]]:
    items = [(p, first) for p in prompts]
    return items + ([(p, second) for p in prompts] if second is not None else [])


def _compare(model, tokenizer, prompts, better: str, worse: str | None, batch_size) -> list[dict[str, Any]]:
    """Per prompt: is ``better`` more likely than ``worse`` (per token), their probabilities, and
    greedy exact match of ``better``."""
    scores = score_targets(model, tokenizer, _pairs(prompts, better, worse), batch_size=batch_size)
    n = len(prompts)
    out = []
    for i, prompt in enumerate(prompts):
        b = scores[i]
        record = {"prompt": prompt, "target": better, "prob": math.exp(b.logprob), "exact_match": b.greedy}
        if worse is not None:
            w = scores[n + i]
            record.update(other=worse, other_prob=math.exp(w.logprob), success=b.mean_logprob > w.mean_logprob)
        out.append(record)
    return out


def measure(
    model, tokenizer, requests: list[EditRequest], old_answers: list[str | None], *, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Per request: its efficacy, generalisation and specificity records (see the module doc)."""
    records = []
    for r, old in zip(requests, old_answers):
        neighbours = []
        for nb in r.neighbours:
            neighbours += _compare(model, tokenizer, [nb.prompt], nb.answer, r.target_new, batch_size)
        records.append(
            {
                "subject": r.subject,
                "prompt": r.text,
                "target_new": r.target_new,
                "old_answer": old,
                "efficacy": _compare(model, tokenizer, [r.text], r.target_new, old, batch_size)[0],
                "paraphrases": _compare(model, tokenizer, r.paraphrases, r.target_new, old, batch_size)
                if r.paraphrases
                else [],
                "neighbours": neighbours,
            }
        )
    return records


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _block(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not items:
        return None
    judged = [x["success"] for x in items if "success" in x]
    block = {
        "success": _mean([float(s) for s in judged]),
        "exact_match": _mean([float(x["exact_match"]) for x in items]),
        "prob_target": _mean([x["prob"] for x in items]),
        "n": len(items),
    }
    others = [x["other_prob"] for x in items if "other_prob" in x]
    if others:
        block["prob_other"] = _mean(others)
    return block


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over requests: efficacy (target = target_new, other = the old answer), generalisation
    (the same on paraphrases), specificity (target = the neighbour's answer, other = target_new)."""
    return {
        "efficacy": _block([r["efficacy"] for r in records]),
        "generalisation": _block([p for r in records for p in r["paraphrases"]]),
        "specificity": _block([n for r in records for n in r["neighbours"]]),
    }


def drift(before: torch.Tensor, after: torch.Tensor) -> dict[str, float] | None:
    """How far next-token distributions moved: mean KL(before || after) and the largest change of
    any token's probability, over the rows of two [n, vocab] log-prob tensors."""
    if before.numel() == 0:
        return None
    kl = (before.exp() * (before - after)).sum(-1)
    return {"kl": float(kl.mean()), "max_prob_change": float((after.exp() - before.exp()).abs().max())}


def neighbour_prompts(requests: list[EditRequest]) -> list[str]:
    return [nb.prompt for r in requests for nb in r.neighbours]
