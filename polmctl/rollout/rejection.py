"""Sampling rounds for rejection-sampling fine-tuning, as a batch source for the engine.

Each round: the next ``prompts_per_round`` prompts, ``num_samples`` answers each from the
current model, the accepted ones (reward >= threshold, at most ``max_per_prompt`` distinct
answers per prompt) encoded exactly as SFT data, then ``steps_per_round`` steps of SFT
batches over them. See polmctl/objectives/rejection.py for the knobs.
"""

from __future__ import annotations

import time

from polmctl.data import encode_dataset
from polmctl.engine.batches import BatchSampler, OfflineBatches
from polmctl.engine.errors import TrainingError
from polmctl.evals.arithmetic import prompt_of
from polmctl.rollout.backends import make_backend
from polmctl.rollout.online import sample_and_score
from polmctl.rollout.rewards import CombinedReward


class RejectionSamplingBatches:
    def __init__(self, rows: list[dict], *, objective, tokenizer, cfg, accelerator):
        self.rows, self.objective, self.tokenizer, self.cfg = rows, objective, tokenizer, cfg
        self.method = objective.method
        self.accelerator = accelerator
        self.prompts = BatchSampler(len(rows), min(self.method.prompts_per_round, len(rows)), seed=cfg.seed,
                                    shuffle=cfg.data.shuffle, rank=accelerator.process_index,
                                    world_size=accelerator.num_processes)
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

    @property
    def progress_epochs(self) -> float:
        return self.prompts.progress_epochs

    def state_dict(self) -> dict:
        # A resumed run starts a new round; the prompts continue where they were.
        return {**self.prompts.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state)
        self.rounds = state.get("rounds", 0)

    def _new_round(self, model) -> None:
        m = self.method
        started = time.perf_counter()
        for empty in range(m.max_empty_rounds):
            rows = [self.rows[i] for i in self.prompts.next()]
            _, texts, total, _ = sample_and_score(model, self.tokenizer, self.reward, rows, m.num_samples, m,
                                                  batch_index=self.rounds, backend=self.backend)
            self.rounds += 1
            accepted = self._accepted(rows, texts, total.tolist())
            if accepted:
                break
        else:
            raise TrainingError(f"rejection sampling: {m.max_empty_rounds} rounds in a row accepted no answer "
                                f"(method.threshold={m.threshold}); lower the threshold, raise method.num_samples "
                                "or method.temperature, or start from a model that solves some prompts")
        data = self.cfg.data
        examples, _ = encode_dataset(accepted, self.tokenizer, source=f"rejection sampling round {self.rounds}",
                                     max_length=data.max_length, overlong=data.overlong,
                                     completion_only_loss=data.completion_only_loss)
        size = min(self.cfg.trainer.micro_batch_size, len(examples))  # a small round still makes whole batches
        self.round_batches = OfflineBatches(examples, self.objective.collate, size, self.cfg.trainer.grad_accum,
                                            seed=self.cfg.seed + self.rounds, shuffle=True)
        self.steps_left = m.steps_per_round
        n = len(texts)
        self.round_metrics = {"round": float(self.rounds), "reward": sum(total.tolist()) / n,
                              "acceptance_rate": sum(v >= m.threshold for v in total.tolist()) / n,
                              "accepted_examples": float(len(examples)), "rollout_time_s": time.perf_counter() - started}

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
