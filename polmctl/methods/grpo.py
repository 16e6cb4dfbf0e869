"""GRPO and its variants (Dr. GRPO, DAPO, RLOO): sample G completions per prompt, score
them with reward functions, and train on group-relative advantages with a clipped ratio.

    polmctl run recipe=grpo method.num_generations=8 method.beta=0.04
    polmctl run recipe=grpo method.loss_type=dr_grpo method.scale_rewards=none
    polmctl run recipe=grpo method.loss_type=dapo method.epsilon_high=0.28 method.dynamic_sampling=true
    polmctl run recipe=rloo

Features and the flag that controls each:
  completions per prompt            method.num_generations (G)
  rewards, weighted, each logged    method.rewards: [math_answer, {name: format, weight: 0.2}, {_target_: ...}]
  advantage baseline / scaling      method.baseline: mean | leave_one_out (RLOO); method.scale_rewards: std | none
  loss normalisation                method.loss_type: grpo | dr_grpo | dapo | bnpo
  importance ratio                  method.importance_level: token (GRPO) | sequence (RLOO's paper, TRL's RLOO)
  clipping (clip-higher)            method.epsilon_low, method.epsilon_high
  KL to the reference (k3)          method.beta (0: no reference forward at all)
  reuse of a rollout batch          method.num_iterations (old log-probs computed once per rollout)
  drop groups with equal rewards    method.dynamic_sampling (DAPO)
  sampling                          method.temperature, method.top_p, method.max_new_tokens, method.stop
  generation backend                method.generation_backend: transformers | vllm

Every ``method.num_iterations`` optimizer steps the batch source (``GRPOBatches``) takes the
next prompts (micro_batch_size x grad_accum / G of them, seeded and resumable like offline
data), samples G completions of each with the current policy, scores them, turns the rewards
into group-relative advantages, and computes once what every iteration on this rollout reuses:
the old-policy log-probs (only when num_iterations > 1; on-policy they equal the current ones)
and the reference log-probs (only when beta > 0; methods/reference.py). The losses are in
polmctl/losses/policy_gradient.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import one_of, option, positive
from polmctl.data.prompts import completion_batches, prompt_rows
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError, TrainingError
from polmctl.losses import IGNORE_INDEX
from polmctl.losses import policy_gradient as pg
from polmctl.methods.rollouts import RolloutBatches
from polmctl.models.forward import policy_forward, token_logps
from polmctl.rollout.sampling import ScoredSamplingOptions, sample_and_score


@dataclass
class GRPOMethod(ScoredSamplingOptions):
    name: str = option("grpo", "grpo: online RL on group-relative advantages (GRPO, Dr. GRPO, DAPO, RLOO)")
    num_generations: int = option(4, "completions sampled per prompt (the group size G)")
    loss_type: str = option(
        "grpo", "grpo (per-sequence mean) | dr_grpo (constant normaliser) | dapo (token mean) | bnpo"
    )
    importance_level: str = option(
        "token",
        "token: a ratio per token, clipped per token (GRPO, PPO) | sequence: one "
        "ratio per completion, exp of its summed log-ratio, and a loss per "
        "completion (RLOO's paper and TRL's RLOOTrainer; loss_type is not used)",
    )
    scale_rewards: str = option("std", "std: divide advantages by the group's reward std | none (Dr. GRPO)")
    baseline: str = option("mean", "mean: group mean (GRPO) | leave_one_out: mean of the other G-1 (RLOO)")
    epsilon_low: float = option(0.2, "lower clip range of the ratio")
    epsilon_high: float = option(0.2, "upper clip range of the ratio (DAPO's clip-higher: 0.28)")
    beta: float = option(0.0, "weight of the k3 KL penalty to the reference (0: no reference is run)")
    num_iterations: int = option(1, "optimizer steps on each rollout batch (mu)")
    dynamic_sampling: bool = option(False, "drop groups whose rewards are all equal and sample again (DAPO)")
    max_resamples: int = option(4, "with dynamic_sampling: rollouts tried before a step gives up")

    def check(self, section: str) -> None:
        one_of(section, "loss_type", self.loss_type, pg.LOSS_TYPES)
        one_of(section, "importance_level", self.importance_level, pg.IMPORTANCE_LEVELS)
        one_of(section, "scale_rewards", self.scale_rewards, ("std", "none"))
        one_of(section, "baseline", self.baseline, ("mean", "leave_one_out"))
        if self.num_generations < 2:
            raise ConfigError(
                f"{section}.num_generations", f"must be at least 2 to compare completions, got {self.num_generations}"
            )
        self.check_sampling(section)
        for name in ("num_iterations", "max_resamples"):
            positive(section, name, getattr(self, name))
        for name in ("epsilon_low", "epsilon_high", "beta"):
            positive(section, name, getattr(self, name), zero_ok=True)


class GRPOObjective(Objective):
    """The loss on a batch of rollouts: the clipped policy-gradient loss of its completions.

    A batch (made by ``GRPOBatches``) holds input_ids / attention_mask / labels (labels only on
    completion tokens), ``advantages`` [B], and ``old_logps`` / ``ref_logps`` [B, T] when they
    were computed for the rollout.
    """

    def __init__(self, method: GRPOMethod):
        self.method = method

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        return prompt_rows(rows, data.source)

    def weight(self, batch: dict) -> int:
        m = self.method
        return pg.policy_loss_weight(batch["labels"][:, 1:] != IGNORE_INDEX, m.loss_type, m.importance_level)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        m = self.method
        out = policy_forward(model, batch, entropy=True, share_prompts=True)  # G rows per prompt
        logps, mask = out.logps, out.mask
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(logps)  # on-policy: ratio 1, gradient of logp
        ref = batch.get("ref_logps")
        loss_sum, weight, metrics = pg.clipped_policy_loss(
            logps,
            old,
            batch["advantages"].to(logps),
            mask,
            epsilon_low=m.epsilon_low,
            epsilon_high=m.epsilon_high,
            loss_type=m.loss_type,
            ref_logps=None if ref is None else ref.to(logps),
            beta=m.beta,
            max_completion_length=m.max_new_tokens,
            importance_level=m.importance_level,
        )
        metrics["entropy"] = (out.entropy.sum(), mask.sum())
        return LossTerms(loss_sum=loss_sum, weight=weight, metrics=metrics)

    def make_batches(self, examples: list[dict], *, model, tokenizer, cfg, accelerator) -> GRPOBatches:
        return GRPOBatches(
            examples,
            method=self.method,
            tokenizer=tokenizer,
            trainer_cfg=cfg.trainer,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            accelerator=accelerator,
        )


class GRPOBatches(RolloutBatches):
    """Rollouts of the current policy, one every ``method.num_iterations`` optimizer steps."""

    def rollout(self, model) -> tuple[list[dict], dict[str, float]]:
        m, G = self.method, self.method.num_generations
        started = time.perf_counter()
        rows, completion_ids, rewards, per_function, zero_std = [], [], [], {}, []
        for _ in range(m.max_resamples if m.dynamic_sampling else 1):
            batch_rows = [self.rows[i] for i in self.sampler.next()]
            ids, _, total, parts = sample_and_score(
                model, self.tokenizer, self.reward, batch_rows, G, m, batch_index=self.rollouts, backend=self.backend
            )
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
            raise TrainingError(
                f"rollout {self.rollouts}: every group of {m.max_resamples} rollouts had equal rewards "
                "(dynamic sampling keeps none); raise method.max_resamples or "
                "method.temperature, or check the reward functions"
            )
        rewards = torch.cat(rewards)
        advantages = pg.group_advantages(rewards, G, scale=m.scale_rewards, baseline=m.baseline)
        prompts = self.prompt_ids(rows)
        batches = completion_batches(
            prompts,
            completion_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            micro_batch_size=self.micro_batch_size,
            advantages=advantages,
        )
        self._precompute(model, batches)
        lengths = torch.tensor([float(len(c)) for c in completion_ids])
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": sum(zero_std) / len(zero_std),
            "completion_length": lengths.mean().item(),
            "rollout_time_s": time.perf_counter() - started,
        }
        for name, values in per_function.items():
            metrics[f"rewards/{name}"] = torch.cat(values).mean().item()
        return batches, metrics

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
                    batch["ref_logps"] = self.reference.run(
                        model, lambda ref: token_logps(ref, on_device, share_prompts=True)[0]
                    ).cpu()
        finally:
            model.train(was_training)
