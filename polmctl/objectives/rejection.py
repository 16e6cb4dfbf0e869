"""Rejection-sampling fine-tuning (RFT, STaR-style): sample k answers per prompt with the
current model, keep the ones the reward accepts, and fine-tune on them with the SFT loss;
round after round, each round sampling with the model the last one trained.

    polmctl run recipe=rejection_sampling
    polmctl run recipe=rejection_sampling method.num_samples=8 method.steps_per_round=10 trainer.max_steps=40

Features and the flag that controls each:
  answers sampled per prompt        method.num_samples
  what counts as accepted           method.rewards (weighted sum) >= method.threshold
  kept per prompt                   method.max_per_prompt (distinct answers, best first)
  round size                        method.prompts_per_round, method.steps_per_round (rounds = max_steps / steps_per_round)
  sampling                          method.temperature, method.top_p, method.max_new_tokens, method.stop
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from polmctl.config.schema import positive
from polmctl.objectives.online import prompt_rows
from polmctl.objectives.pairwise import _help
from polmctl.objectives.sft import SFTMethod, SFTObjective
from polmctl.rollout.sampling import ScoredSamplingOptions


@dataclass
class RejectionSamplingMethod(ScoredSamplingOptions):
    objective: str = _help("rejection_sampling", "rejection_sampling: SFT on the model's own accepted samples")
    threshold: float = _help(1.0, "a sample is accepted when its reward is at least this")
    num_samples: int = _help(4, "answers sampled per prompt")
    max_per_prompt: int = _help(1, "accepted answers kept per prompt (distinct, highest reward first)")
    prompts_per_round: int = _help(64, "prompts sampled in each round")
    steps_per_round: int = _help(10, "optimizer steps on each round's accepted answers")
    max_empty_rounds: int = _help(3, "rounds in a row with nothing accepted before the run stops")

    def check(self, section: str) -> None:
        for name in ("num_samples", "max_per_prompt", "prompts_per_round", "steps_per_round", "max_empty_rounds"):
            positive(section, name, getattr(self, name))
        self.check_sampling(section)  # acceptance: the rewards' weighted sum >= method.threshold


class RejectionSamplingObjective(SFTObjective):
    """The SFT loss; the batches come from sampling rounds (rollout/rejection.py)."""

    def __init__(self, method: RejectionSamplingMethod):
        super().__init__(SFTMethod())
        self.method = method

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id = tokenizer.pad_token_id
        return prompt_rows(rows, data.source)

    def make_batches(self, rows: list[dict], *, model, tokenizer, cfg, accelerator):
        from polmctl.rollout.rejection import RejectionSamplingBatches

        return RejectionSamplingBatches(rows, objective=self, tokenizer=tokenizer, cfg=cfg, accelerator=accelerator)
