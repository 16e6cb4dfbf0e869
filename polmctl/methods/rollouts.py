"""What the on-policy RL methods (GRPO / RLOO, PPO) share: a batch source that samples the
current policy once every ``method.num_iterations`` optimizer steps and trains on that rollout
for all of them.

    polmctl run recipe=grpo method.num_iterations=2 trainer.micro_batch_size=8 trainer.grad_accum=2

A step holds micro_batch_size x grad_accum completions: ``prompts_per_step`` prompts of the data
(seeded and resumable like offline data) times ``method.num_generations`` samples each. A method
implements ``rollout(model)``; this class keeps the prompts' position, the reward functions, the
generation backend and the reference (polmctl/methods/reference.py).
"""

from __future__ import annotations

from polmctl.data import format_prompt
from polmctl.data.prompts import prompt_of
from polmctl.engine.batches import BatchSampler, BatchSource
from polmctl.errors import TrainingError
from polmctl.methods.reference import Reference
from polmctl.rollout.backends import make_backend
from polmctl.rollout.rewards import CombinedReward


class RolloutBatches(BatchSource):
    counters = ("rollouts",)

    def __init__(self, rows: list[dict], *, method, tokenizer, trainer_cfg, seed: int, shuffle: bool, accelerator):
        self.rows, self.method, self.tokenizer = rows, method, tokenizer
        self.device = accelerator.device
        self.micro_batch_size = trainer_cfg.micro_batch_size
        completions = trainer_cfg.micro_batch_size * trainer_cfg.grad_accum
        if completions % method.num_generations:
            raise TrainingError(
                f"trainer.micro_batch_size x trainer.grad_accum = {completions} completions per step "
                f"is not a multiple of method.num_generations={method.num_generations}; make it one"
            )
        self.prompts_per_step = completions // method.num_generations
        self.sampler = BatchSampler(
            len(rows),
            self.prompts_per_step,
            seed=seed,
            shuffle=shuffle,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        self.reward = CombinedReward.from_specs(method.rewards)
        self.backend = make_backend(method)
        self.reference = Reference()
        self.rollouts = 0
        self._cached: tuple[list[dict], dict[str, float]] | None = None
        self._uses_left = 0

    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        if self._uses_left == 0:
            self._cached = self.rollout(model)
            self._uses_left = self.method.num_iterations
        self._uses_left -= 1
        return self._cached

    def rollout(self, model) -> tuple[list[dict], dict[str, float]]:
        """Sample, score and prepare one rollout's micro-batches and its metrics."""
        raise NotImplementedError

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        """Each row's prompt, rendered with the chat template and tokenized as the rollout saw it."""
        tok = self.tokenizer
        return [tok(format_prompt(prompt_of(r), tok), add_special_tokens=False)["input_ids"] for r in rows]
