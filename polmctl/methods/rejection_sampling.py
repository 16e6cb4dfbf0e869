"""Rejection-sampling fine-tuning (RFT, STaR-style): sample k answers per prompt with the
current model, keep the ones the reward accepts, and fine-tune on them with the SFT loss;
round after round, each round sampling with the model the last one trained.

    polmctl run recipe=rejection_sampling
    polmctl run recipe=rejection_sampling method.num_samples=8 method.steps_per_round=10 trainer.max_steps=40

Features and the flag that controls each:
  answers sampled per prompt        method.num_samples
  what counts as accepted           method.rewards (weighted sum) >= method.threshold
  kept per prompt                   method.max_per_prompt (distinct answers, best first)
  round size                        method.prompts_per_round, method.steps_per_round
                                    (rounds = max_steps / steps_per_round)
  sampling                          method.temperature, method.top_p, method.max_new_tokens, method.stop

Each round (``RejectionSamplingBatches``): the next ``prompts_per_round`` prompts, ``num_samples``
answers each from the current model, the accepted ones encoded exactly as SFT data, then
``steps_per_round`` steps of SFT batches over them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import option, positive
from polmctl.data import encode_dataset
from polmctl.data.prompts import prompt_of, prompt_rows
from polmctl.engine.batches import BatchSampler, BatchSource, OfflineBatches, on_every_rank
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import TrainingError
from polmctl.methods.sft import SFTObjective
from polmctl.rollout.backends import make_backend
from polmctl.rollout.reward_data import check_reward_data
from polmctl.rollout.rewards import CombinedReward
from polmctl.rollout.sampling import ScoredSamplingOptions, sample_and_score


@dataclass
class RejectionSamplingMethod(ScoredSamplingOptions):
    name: str = option("rejection_sampling", "rejection_sampling: SFT on the model's own accepted samples")
    threshold: float = option(1.0, "a sample is accepted when its reward is at least this")
    num_samples: int = option(4, "answers sampled per prompt")
    max_per_prompt: int = option(1, "accepted answers kept per prompt (distinct, highest reward first)")
    prompts_per_round: int = option(64, "prompts sampled in each round")
    steps_per_round: int = option(10, "optimizer steps on each round's accepted answers")
    max_empty_rounds: int = option(3, "rounds in a row with nothing accepted before the run stops")

    def check(self, section: str) -> None:
        for name in ("num_samples", "max_per_prompt", "prompts_per_round", "steps_per_round", "max_empty_rounds"):
            positive(section, name, getattr(self, name))
        self.check_sampling(section)  # acceptance: the rewards' weighted sum >= method.threshold


class RejectionSamplingObjective(Objective):
    """SFT's loss and collation on the accepted answers; the batches come from sampling rounds."""

    def __init__(self, method: RejectionSamplingMethod):
        self.method = method
        self.sft = SFTObjective()

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.sft.pad_token_id = tokenizer.pad_token_id
        rows, stats = prompt_rows(rows, data.source)
        return rows, check_reward_data(rows, self.method.rewards, data.source, stats)  # before the model loads

    def collate(self, examples: list[dict]) -> dict:
        return self.sft.collate(examples)

    def weight(self, batch: dict) -> int:
        return self.sft.weight(batch)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        return self.sft(model, batch)

    def make_batches(self, examples: list[dict], *, model, tokenizer, cfg, accelerator) -> RejectionSamplingBatches:
        return RejectionSamplingBatches(examples, objective=self, tokenizer=tokenizer, cfg=cfg, accelerator=accelerator)


class RejectionSamplingBatches(BatchSource):
    counters = ("rounds",)

    def __init__(self, rows: list[dict], *, objective: RejectionSamplingObjective, tokenizer, cfg, accelerator):
        self.rows, self.objective, self.tokenizer, self.cfg = rows, objective, tokenizer, cfg
        self.method = objective.method
        self.micro_batch_size = cfg.trainer.micro_batch_size
        self.sampler = BatchSampler(
            len(rows),
            min(self.method.prompts_per_round, len(rows)),
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        self.reward = CombinedReward.from_specs(self.method.rewards)
        self.backend = make_backend(self.method)
        self.rounds, self.steps_left, self.round_batches = 0, 0, None
        self.round_metrics: dict[str, float] = {}

    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        if self.steps_left == 0:
            self._new_round(model)
        self.steps_left -= 1
        batches, _ = self.round_batches.next_step(model)
        metrics, self.round_metrics = self.round_metrics, {}  # a round's sampling metrics go on its first step
        return batches, metrics

    def _new_round(self, model) -> None:
        m = self.method
        started = time.perf_counter()
        accepted: list[dict] = []
        for _ in range(m.max_empty_rounds):
            rows = [self.rows[i] for i in self.sampler.next()]
            _, texts, total, _ = sample_and_score(
                model,
                self.tokenizer,
                self.reward,
                rows,
                m.num_samples,
                m,
                batch_index=self.rounds,
                backend=self.backend,
            )
            self.rounds += 1
            accepted += self._accepted(rows, texts, total.tolist())
            if on_every_rank(bool(accepted)):  # a rank with answers samples again beside one without
                break
        if not accepted:
            raise TrainingError(
                f"rejection sampling: {m.max_empty_rounds} rounds in a row accepted no answer "
                f"(method.threshold={m.threshold}); lower the threshold, raise method.num_samples "
                "or method.temperature, or start from a model that solves some prompts"
            )
        data = self.cfg.data
        examples, _ = encode_dataset(
            accepted,
            self.tokenizer,
            source=f"rejection sampling round {self.rounds}",
            max_length=data.max_length,
            overlong=data.overlong,
            completion_only_loss=data.completion_only_loss,
        )
        size = min(self.cfg.trainer.micro_batch_size, len(examples))  # a small round still makes whole batches
        self.round_batches = OfflineBatches(
            examples,
            self.objective.collate,
            size,
            self.cfg.trainer.grad_accum,
            seed=self.cfg.seed + self.rounds,
            shuffle=True,
        )
        self.steps_left = m.steps_per_round
        n = len(texts)
        self.round_metrics = {
            "round": float(self.rounds),
            "reward": sum(total.tolist()) / n,
            "acceptance_rate": sum(v >= m.threshold for v in total.tolist()) / n,
            "accepted_examples": float(len(examples)),
            "rollout_time_s": time.perf_counter() - started,
        }

    def _accepted(self, rows: list[dict], texts: list[str], rewards: list[float]) -> list[dict]:
        """The kept {prompt, completion} rows: per prompt, distinct accepted answers, best first."""
        m, kept = self.method, []
        for p, row in enumerate(rows):
            group = sorted(range(p * m.num_samples, (p + 1) * m.num_samples), key=lambda i: -rewards[i])
            seen: set[str] = set()
            for i in group:
                answer = texts[i].strip()
                if rewards[i] >= m.threshold and answer and answer not in seen and len(seen) < m.max_per_prompt:
                    seen.add(answer)
                    kept.append({"prompt": prompt_of(row), "completion": answer})
        return kept
