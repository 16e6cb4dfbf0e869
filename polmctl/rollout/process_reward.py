"""A process reward model (recipe=prm) as a reward function, and the step scoring the prm eval shares.

    polmctl run recipe=rejection_sampling "method.rewards=[{name: prm, path: outputs/prm/2026-12-03/10-00-00}]"
    polmctl run recipe=grpo "method.rewards=[math_answer, {name: prm, path: <run dir>, kwargs: {aggregate: product}}]"

A completion is cut into steps at the PRM's step separator (the ``method.step_separator`` its
recipe=prm run trained with, which its config.json records; ``kwargs: {step_separator: ...}``
overrides it); each step is stripped and empty ones dropped, as TRL's Math-Shepherd converter
does. The prompt and steps are tokenized exactly as training tokenized them
(``polmctl.data.steps.encode_steps``), and each step is scored by the probability of its
"correct" label at its separator. The completion's reward aggregates its steps' scores:
``min`` (default: a solution is as good as its weakest step) or ``product`` (the chance that
every step is right, if the steps' errors were independent). A completion with no step scores 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from polmctl.data.preference import pad_sequences
from polmctl.data.steps import encode_steps, separator_ids
from polmctl.losses.process import step_scores

AGGREGATES = ("min", "product")
DEFAULT_SEPARATOR = "\n"  # recipe=prm's default method.step_separator, and TRL's


def step_separator_of(model) -> str:
    """The separator a PRM was trained with (recipe=prm writes it into the config), else the default."""
    return getattr(model.config, "step_separator", None) or DEFAULT_SEPARATOR


@torch.no_grad()
def score_steps(
    model, sequences: list[list[int]], ends: list[list[int]], pad_token_id: int, batch_size: int
) -> list[list[float]]:
    """Each sequence's step scores (P(correct) at its label positions ``ends``), from a
    token-classification PRM run in eval mode (and left in the mode it was in)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    try:
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i : i + batch_size]
            batch = pad_sequences(chunk, chunk, pad_token_id)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
            probs = step_scores(logits).cpu()
            scores += [probs[row, positions].tolist() for row, positions in enumerate(ends[i : i + batch_size])]
    finally:
        model.train(was_training)
    return scores


def check_aggregate(how: str) -> None:
    if how not in AGGREGATES:
        raise ValueError(f"aggregate={how!r}: use one of {', '.join(AGGREGATES)} (the prm reward's kwargs)")


def aggregate_steps(scores: list[float], how: str) -> float:
    """The steps' ``min`` or ``product``; 0 without a step."""
    check_aggregate(how)
    if not scores:
        return 0.0
    return min(scores) if how == "min" else math.prod(scores)


def split_steps(completion: str, separator: str) -> list[str]:
    return [step.strip() for step in completion.split(separator) if step.strip()]


class ProcessRewardScorer:
    """A reward function over a loaded PRM: ``fn(prompts, completions, aggregate=..., step_separator=...)``."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.separator = step_separator_of(model)

    def step_scores(self, prompts: list, completions: list[str], separator: str) -> list[list[float]]:
        """Each completion's step scores ([] for a completion without a step)."""
        sep_ids = separator_ids(self.tokenizer, separator, "the prm reward's step_separator")
        steps = [split_steps(c, separator) for c in completions]
        encoded = [encode_steps(p, s, self.tokenizer, sep_ids) for p, s in zip(prompts, steps) if s]
        sequences, ends = [ids for ids, _ in encoded], [e for _, e in encoded]
        scored = iter(score_steps(self.model, sequences, ends, self.tokenizer.pad_token_id, self.batch_size))
        return [next(scored) if s else [] for s in steps]

    def __call__(
        self, prompts: list, completions: list[str], *, aggregate: str = "min", step_separator: str | None = None, **_
    ) -> list[float]:
        check_aggregate(aggregate)  # before any forward pass
        scores = self.step_scores(prompts, completions, step_separator or self.separator)
        return [aggregate_steps(s, aggregate) for s in scores]


def load_prm_scorer(path: str, *, device: str = "cpu", batch_size: int = 8) -> ProcessRewardScorer:
    """The ``prm`` registry entry: ``{name: prm, path: <prm run dir or final/>, device: cuda, batch_size: 16}``."""
    from polmctl.config.schema import ModelConfig
    from polmctl.errors import ModelError
    from polmctl.models import load_model, load_tokenizer, model_head, resolve_model_path

    cfg = ModelConfig(name_or_path=path)
    resolved = resolve_model_path(path)
    # Any other model would load with a fresh, random token-classification head: refuse it.
    if Path(resolved).is_dir() and model_head(resolved) != "prm":
        raise ModelError(
            f"{path} holds a {model_head(resolved)} model, not a process reward model; point the prm reward "
            "at the run dir (or final/) of a recipe=prm run"
        )
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, device=device, for_training=False, head="prm")
    return ProcessRewardScorer(model, tokenizer, batch_size=batch_size)
