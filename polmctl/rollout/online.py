"""The rollout phase of online RL, as a batch source for the one training engine.

    polmctl run recipe=grpo trainer.micro_batch_size=8 trainer.grad_accum=2 method.num_generations=4

Every ``method.num_iterations`` optimizer steps: take the next prompts (micro_batch_size x
grad_accum / G of them, seeded and resumable like offline data), sample G completions of
each with the current policy, score them with the reward functions, turn the rewards into
group-relative advantages, and compute once what every iteration on this rollout reuses:
the old-policy log-probs (only when num_iterations > 1; on-policy they equal the current
ones) and the reference log-probs (only when beta > 0; the adapter-disabled model with
LoRA). The step's metrics carry the rollout's reward statistics and its timing.
"""

from __future__ import annotations

import copy
import time

import torch

from polmctl.data import format_prompt
from polmctl.data.preference import IGNORE_INDEX, pad_sequences
from polmctl.engine.batches import BatchSampler
from polmctl.engine.errors import TrainingError
from polmctl.evals.arithmetic import prompt_of
from polmctl.objectives import policy_gradient as pg
from polmctl.objectives.base import token_logps
from polmctl.rollout.backends import TransformersBackend, make_backend
from polmctl.rollout.rewards import CombinedReward


class RolloutBatches:
    def __init__(self, rows: list[dict], *, method, tokenizer, trainer_cfg, seed: int, shuffle: bool, accelerator):
        self.rows, self.method, self.tokenizer, self.cfg = rows, method, tokenizer, trainer_cfg
        self.device = accelerator.device
        completions = trainer_cfg.micro_batch_size * trainer_cfg.grad_accum
        if completions % method.num_generations:
            raise TrainingError(f"trainer.micro_batch_size x trainer.grad_accum = {completions} completions per step "
                                f"is not a multiple of method.num_generations={method.num_generations}; make it one")
        self.prompts_per_step = completions // method.num_generations
        self.sampler = BatchSampler(len(rows), self.prompts_per_step, seed=seed, shuffle=shuffle,
                                    rank=accelerator.process_index, world_size=accelerator.num_processes)
        self.reward = CombinedReward.from_specs(method.rewards)
        self.backend = make_backend(method)
        self.reference = None  # a frozen copy, only for full fine-tuning with beta > 0
        self.rollouts = 0
        self._cached: tuple[list[dict], dict[str, float]] | None = None
        self._uses_left = 0

    # -- the batch-source interface of engine.Trainer ------------------------------------------
    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        if self._uses_left == 0:
            self._cached = self._rollout(model)
            self._uses_left = self.method.num_iterations
        self._uses_left -= 1
        return self._cached

    @property
    def progress_epochs(self) -> float:
        return self.sampler.progress_epochs

    def state_dict(self) -> dict:
        # A resumed run starts a fresh rollout: the prompts continue where they were.
        return {**self.sampler.state_dict(), "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.rollouts = state.get("rollouts", 0)

    # -- one rollout ------------------------------------------------------------------------
    def _rollout(self, model) -> tuple[list[dict], dict[str, float]]:
        m, G = self.method, self.method.num_generations
        started = time.perf_counter()
        rows, completion_ids, rewards, per_function, zero_std = [], [], [], {}, []
        for _ in range(m.max_resamples if m.dynamic_sampling else 1):
            batch_rows = [self.rows[i] for i in self.sampler.next()]
            ids, _, total, parts = sample_and_score(model, self.tokenizer, self.reward, batch_rows, G, m,
                                                    batch_index=self.rollouts, backend=self.backend)
            zero_std.append(pg.zero_variance_fraction(total, G))
            keep = pg.informative_groups(total, G) if m.dynamic_sampling else torch.ones_like(total, dtype=torch.bool)
            kept_rows = [r for r in batch_rows for _ in range(G)]
            rows += [r for r, k in zip(kept_rows, keep) if k]
            completion_ids += [c for c, k in zip(ids, keep) if k]
            rewards.append(total[keep])
            for name, values in parts.items():
                per_function.setdefault(name, []).append(values)
            if len(rows) >= self.prompts_per_step * G // 2 or not m.dynamic_sampling:
                break
        self.rollouts += 1
        if not rows:
            raise TrainingError(f"rollout {self.rollouts}: every group of {m.max_resamples} rollouts had equal rewards "
                                "(dynamic sampling keeps none); raise method.max_resamples or "
                                "method.temperature, or check the reward functions")
        rewards = torch.cat(rewards)
        advantages = pg.group_advantages(rewards, G, scale=m.scale_rewards, baseline=m.baseline)
        batches = self._micro_batches(rows, completion_ids, advantages=advantages)
        self._precompute(model, batches)
        lengths = torch.tensor([float(len(c)) for c in completion_ids])
        metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                   "frac_reward_zero_std": sum(zero_std) / len(zero_std),
                   "completion_length": lengths.mean().item(), "rollout_time_s": time.perf_counter() - started}
        for name, values in per_function.items():
            metrics[f"rewards/{name}"] = torch.cat(values).mean().item()
        return batches, metrics

    def _micro_batches(self, rows, completion_ids, **per_row: torch.Tensor) -> list[dict]:
        """Prompt + completion sequences (labels on the completion) in micro-batches, each with
        its slice of the ``per_row`` tensors (GRPO: advantages; PPO: scores)."""
        sequences, labels = [], []
        for row, completion in zip(rows, completion_ids):
            prompt = self.tokenizer(format_prompt(prompt_of(row), self.tokenizer), add_special_tokens=False)["input_ids"]
            completion = completion or [self.tokenizer.eos_token_id]  # an empty sample still has a token to score
            sequences.append(prompt + completion)
            labels.append([IGNORE_INDEX] * len(prompt) + completion)
        size = self.cfg.micro_batch_size
        batches = []
        for start in range(0, len(sequences), size):
            batch = pad_sequences(sequences[start : start + size], labels[start : start + size],
                                  self.tokenizer.pad_token_id)
            batch.update({name: values[start : start + size] for name, values in per_row.items()})
            batches.append(batch)
        return batches

    @torch.no_grad()
    def _precompute(self, model, batches: list[dict]) -> None:
        """Old-policy and reference log-probs, once per rollout, for every iteration on it."""
        m = self.method
        if m.num_iterations == 1 and m.beta == 0:
            return
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                on_device = {k: v.to(self.device) for k, v in batch.items()}
                if m.num_iterations > 1:
                    batch["old_logps"] = token_logps(model, on_device, share_prompts=True)[0].cpu()
                if m.beta > 0:
                    batch["ref_logps"] = self._reference_logps(model, on_device).cpu()
        finally:
            model.train(was_training)

    def _reference_logps(self, model, batch: dict) -> torch.Tensor:
        if hasattr(model, "disable_adapter"):  # LoRA: the base model is the reference, no copy
            with model.disable_adapter():
                return token_logps(model, batch, share_prompts=True)[0]
        if self.reference is None:  # full fine-tuning: freeze the starting weights on first use
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        return token_logps(self.reference, batch, share_prompts=True)[0]


def sample_and_score(model, tokenizer, reward: CombinedReward, rows: list[dict], samples_per_prompt: int, method, *,
                     batch_index: int, backend=None) -> tuple[list[list[int]], list[str], torch.Tensor, dict]:
    """``samples_per_prompt`` sampled completions of each row's prompt, in one generation batch
    (grouped: a row's samples are consecutive): their token ids, texts, total reward, and
    each reward function's values. The rewards see the rows' other columns (e.g. answer).
    ``backend`` (polmctl.rollout.backends; None: transformers) samples with the method's
    temperature, top_p, max_new_tokens and stop strings."""
    backend = backend or TransformersBackend()
    prompts = [format_prompt(prompt_of(r), tokenizer) for r in rows]
    ids = backend.sample(model, tokenizer, prompts, samples_per_prompt, method)
    expanded = [r for r in rows for _ in range(samples_per_prompt)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    columns = {k: [r.get(k) for r in expanded] for k in expanded[0] if k not in ("prompt", "messages", "completion")}
    total, parts = reward([prompt_of(r) for r in expanded], texts, columns, batch_index=batch_index)
    return ids, texts, total, parts
