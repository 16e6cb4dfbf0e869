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
  clipping (clip-higher)            method.epsilon_low, method.epsilon_high
  KL to the reference (k3)          method.beta (0: no reference forward at all)
  reuse of a rollout batch          method.num_iterations (old log-probs computed once per rollout)
  drop groups with equal rewards    method.dynamic_sampling (DAPO)
  sampling                          method.temperature, method.top_p, method.max_new_tokens, method.stop
  generation backend                method.generation_backend: transformers | vllm
The rollout itself lives in polmctl/rollout/online.py; the losses in policy_gradient.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import ConfigError, one_of, positive
from polmctl.data.errors import DataError
from polmctl.objectives import policy_gradient as pg
from polmctl.objectives.base import LossTerms, policy_forward
from polmctl.objectives.pairwise import _help
from polmctl.rollout.sampling import ScoredSamplingOptions


@dataclass
class GRPOMethod(ScoredSamplingOptions):
    objective: str = _help("grpo", "grpo: online RL on group-relative advantages (GRPO, Dr. GRPO, DAPO, RLOO)")
    num_generations: int = _help(4, "completions sampled per prompt (the group size G)")
    loss_type: str = _help("grpo", "grpo (per-sequence mean) | dr_grpo (constant normaliser) | dapo (token mean) | bnpo")
    scale_rewards: str = _help("std", "std: divide advantages by the group's reward std | none (Dr. GRPO)")
    baseline: str = _help("mean", "mean: group mean (GRPO) | leave_one_out: mean of the other G-1 (RLOO)")
    epsilon_low: float = _help(0.2, "lower clip range of the ratio")
    epsilon_high: float = _help(0.2, "upper clip range of the ratio (DAPO's clip-higher: 0.28)")
    beta: float = _help(0.0, "weight of the k3 KL penalty to the reference (0: no reference is run)")
    num_iterations: int = _help(1, "optimizer steps on each rollout batch (mu)")
    dynamic_sampling: bool = _help(False, "drop groups whose rewards are all equal and sample again (DAPO)")
    max_resamples: int = _help(4, "with dynamic_sampling: rollouts tried before a step gives up")

    def check(self, section: str) -> None:
        one_of(section, "loss_type", self.loss_type, pg.LOSS_TYPES)
        one_of(section, "scale_rewards", self.scale_rewards, ("std", "none"))
        one_of(section, "baseline", self.baseline, ("mean", "leave_one_out"))
        if self.num_generations < 2:
            raise ConfigError(f"{section}.num_generations", f"must be at least 2 to compare completions, got "
                              f"{self.num_generations}")
        self.check_sampling(section)
        for name in ("num_iterations", "max_resamples"):
            positive(section, name, getattr(self, name))
        for name in ("epsilon_low", "epsilon_high", "beta"):
            positive(section, name, getattr(self, name), zero_ok=True)


class GRPOObjective:
    """The loss on a batch of rollouts: clipped policy-gradient loss per completion token.

    A batch (made by polmctl/rollout/online.py) holds input_ids / attention_mask / labels
    (labels only on completion tokens), ``advantages`` [B], and ``old_logps`` / ``ref_logps``
    [B, T] when they were computed for the rollout.
    """

    def __init__(self, method: GRPOMethod):
        self.method = method

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        return prompt_rows(rows, data.source)

    def weight(self, batch: dict) -> int:
        return pg.policy_loss_weight(batch["labels"][:, 1:] != -100, self.method.loss_type)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        m = self.method
        out = policy_forward(model, batch, entropy=True, share_prompts=True)  # G rows per prompt
        logps, mask = out.logps, out.mask
        old = batch.get("old_logps")
        old = logps.detach() if old is None else old.to(logps)  # on-policy: ratio 1, gradient of logp
        ref = batch.get("ref_logps")
        loss_sum, weight, metrics = pg.clipped_policy_loss(
            logps, old, batch["advantages"].to(logps), mask, epsilon_low=m.epsilon_low, epsilon_high=m.epsilon_high,
            loss_type=m.loss_type, ref_logps=None if ref is None else ref.to(logps), beta=m.beta,
            max_completion_length=m.max_new_tokens)
        metrics["entropy"] = (out.entropy.sum(), mask.sum())
        return LossTerms(loss_sum=loss_sum, weight=weight, metrics=metrics)

    def make_batches(self, rows: list[dict], *, model, tokenizer, cfg, accelerator):
        """The trainer's batch source: rollouts of the current policy (see rollout/online.py)."""
        from polmctl.rollout.online import RolloutBatches

        return RolloutBatches(rows, method=self.method, tokenizer=tokenizer, trainer_cfg=cfg.trainer, seed=cfg.seed,
                              shuffle=cfg.data.shuffle, accelerator=accelerator)


def prompt_rows(rows: list[dict], source: str) -> tuple[list[dict], "PromptStats"]:
    """Online methods train on prompts: keep the rows (the prompt and the columns the
    rewards read); the rollout renders and tokenizes them."""
    for i, row in enumerate(rows):
        if "prompt" not in row and "messages" not in row:
            raise DataError(f"{source}: row {i} has no 'prompt' (or 'messages') column; online methods sample "
                            "answers for prompts")
    return list(rows), PromptStats(len(rows))


@dataclass
class PromptStats:
    rows: int

    def summary(self) -> str:
        return f"{self.rows} prompts"
