"""GRPO and its variants (Dr. GRPO, DAPO, RLOO, GSPO, CISPO, REINFORCE++): sample G completions
per prompt, score them with reward functions, and train on group-relative advantages with a clipped ratio.

    polmctl run recipe=grpo method.num_generations=8 method.beta=0.04
    polmctl run recipe=grpo method.loss_type=dr_grpo method.scale_rewards=none
    polmctl run recipe=grpo method.loss_type=dapo method.epsilon_high=0.28 method.dynamic_sampling=true
    polmctl run recipe=rloo
    polmctl run recipe=gspo | cispo | reinforce_pp

Features and the flag that controls each:
  completions per prompt            method.num_generations (G)
  rewards, weighted, each logged    method.rewards: [math_answer, {name: format, weight: 0.2}, {_target_: ...}]
  advantage baseline / scaling      method.baseline: mean | leave_one_out (RLOO) | none;
                                    method.scale_rewards: std | none
  advantage normalisation           method.advantage: group (GRPO) | batch (REINFORCE++: over the rollout's tokens)
  loss normalisation                method.loss_type: grpo | dr_grpo | dapo | bnpo | cispo (CISPO's capped IS weights)
  importance ratio                  method.importance_level: token (GRPO) | sequence (RLOO's paper, TRL's RLOO)
                                    | sequence_mean (GSPO)
  clipping (clip-higher)            method.epsilon_low, method.epsilon_high
  KL to the reference               method.beta: k3 in the loss, or with method.kl_in_reward k1 in the reward
                                    (REINFORCE++); 0: no reference forward at all
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

Two sequence-level ratios, two names: ``importance_level=sequence`` is RLOO's exp(sum of token
log-ratios), as TRL's RLOOTrainer, and it kept that name when GSPO arrived; GSPO's length-normalised
exp(mean of token log-ratios), TRL GRPOTrainer's importance_sampling_level="sequence", is
``sequence_mean``. Both give one clipped loss per completion (loss_type is then not used).
REINFORCE++ (``advantage=batch``, ``kl_in_reward``) makes advantages per token: the reward minus
the KL still to come in the completion, whitened over every token of the rollout, so it trains with
the token-level ratio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import one_of, option, positive
from polmctl.console import console
from polmctl.data.prompts import completion_batches, prompt_rows
from polmctl.engine.batches import fewest_on_any_rank, on_every_rank
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError, TrainingError
from polmctl.losses import IGNORE_INDEX
from polmctl.losses import policy_gradient as pg
from polmctl.methods.rollouts import RolloutBatches
from polmctl.models.forward import logits_window, policy_forward, token_logps
from polmctl.rollout.reward_data import check_reward_data
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
        "completion (RLOO's paper and TRL's RLOOTrainer; loss_type is not used) | "
        "sequence_mean: the same with exp of the mean log-ratio (GSPO; TRL GRPO's "
        "importance_sampling_level=sequence)",
    )
    scale_rewards: str = option("std", "std: divide advantages by the group's reward std | none (Dr. GRPO)")
    baseline: str = option(
        "mean",
        "mean: group mean (GRPO) | leave_one_out: mean of the other G-1 (RLOO) | none: the reward "
        "itself (REINFORCE++; needs advantage=batch and scale_rewards=none)",
    )
    advantage: str = option(
        "group",
        "group: the baseline-subtracted (and scale_rewards-scaled) reward per completion | batch: "
        "that, whitened over every completion token of the rollout (REINFORCE++, OpenRLHF)",
    )
    kl_in_reward: bool = option(
        False,
        "fold beta x the per-token k1 KL (logp - ref_logp at rollout) into the reward, each token "
        "returning the reward minus the KL still to come (REINFORCE++), instead of beta x k3 in the "
        "loss; needs advantage=batch and importance_level=token",
    )
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
        one_of(section, "baseline", self.baseline, pg.BASELINES)
        one_of(section, "advantage", self.advantage, ("group", "batch"))
        self._check_estimator(section)
        if self.num_generations < 2:
            raise ConfigError(
                f"{section}.num_generations", f"must be at least 2 to compare completions, got {self.num_generations}"
            )
        self.check_sampling(section)
        for name in ("num_iterations", "max_resamples"):
            positive(section, name, getattr(self, name))
        for name in ("epsilon_low", "epsilon_high", "beta"):
            positive(section, name, getattr(self, name), zero_ok=True)

    def _check_estimator(self, section: str) -> None:
        """The combinations of loss_type, importance_level, baseline and kl_in_reward that mean something."""
        if self.loss_type == "cispo" and self.importance_level != "token":
            raise ConfigError(
                f"{section}.importance_level",
                f"loss_type=cispo weights each token by its own ratio; got {self.importance_level!r}, use token",
            )
        if self.baseline == "none" and (self.advantage != "batch" or self.scale_rewards != "none"):
            raise ConfigError(
                f"{section}.baseline",
                "none leaves the reward uncentred: use it with method.advantage=batch and "
                "method.scale_rewards=none (REINFORCE++), or choose mean | leave_one_out",
            )
        if self.kl_in_reward:
            if self.advantage != "batch":
                raise ConfigError(
                    f"{section}.kl_in_reward",
                    "gives every token its own advantage, which only method.advantage=batch normalises; "
                    "set it (REINFORCE++) or keep the KL in the loss (kl_in_reward=false)",
                )
            if self.importance_level != "token":
                raise ConfigError(
                    f"{section}.kl_in_reward",
                    f"per-token advantages need importance_level=token, got {self.importance_level!r}",
                )
            if self.beta <= 0:
                raise ConfigError(
                    f"{section}.kl_in_reward", "folds beta x KL into the reward, but method.beta is 0; set e.g. 0.01"
                )


class GRPOObjective(Objective):
    """The loss on a batch of rollouts: the clipped policy-gradient loss of its completions.

    A batch (made by ``GRPOBatches``) holds input_ids / attention_mask / labels (labels only on
    completion tokens), ``advantages`` [B] ([B, T] with kl_in_reward), and ``old_logps`` /
    ``ref_logps`` [B, T] when they were computed for the rollout.
    """

    def __init__(self, method: GRPOMethod):
        self.method = method

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        rows, stats = prompt_rows(rows, data.source)
        return rows, check_reward_data(rows, self.method.rewards, data.source, stats)  # before the model loads

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
            beta=0.0 if m.kl_in_reward else m.beta,
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


FLAT_WARN_EVERY = 5  # rollouts in a row with no reward variance in any group before a warning


class GRPOBatches(RolloutBatches):
    """Rollouts of the current policy, one every ``method.num_iterations`` optimizer steps."""

    flat_rollouts = 0  # rollouts in a row where every group's rewards were all equal

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
            if not m.dynamic_sampling or on_every_rank(len(rows) >= self.prompts_per_step * G // 2):
                break  # decided with every rank: each generate() under ZeRO-3 and FSDP is a collective
        if m.dynamic_sampling:  # whole groups kept; each rank trains on as many as the fewest kept
            kept = fewest_on_any_rank(len(rows))
            rows, completion_ids = rows[:kept], completion_ids[:kept]
        self.rollouts += 1
        if not rows:
            raise TrainingError(
                f"rollout {self.rollouts}: every group of {m.max_resamples} rollouts had equal rewards "
                "(dynamic sampling keeps none; with several processes, on at least one); raise method.max_resamples or "
                "method.temperature, or check the reward functions"
            )
        rewards = torch.cat(rewards)[: len(rows)]
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
        kls = self._precompute(model, batches)
        if m.advantage == "batch":
            self._whiten_over_batch(batches, kls)
        lengths = torch.tensor([float(len(c)) for c in completion_ids])
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": sum(zero_std) / len(zero_std),
            "completion_length": lengths.mean().item(),
            "rollout_time_s": time.perf_counter() - started,
        }
        self._watch_flat_rewards(metrics["frac_reward_zero_std"], metrics["reward"])
        for name, values in per_function.items():
            metrics[f"rewards/{name}"] = torch.cat(values).mean().item()
        if kls is not None:  # the k1 folded into the reward, a mean over the rollout's tokens
            metrics["kl"] = (sum(k.sum() for k in kls) / sum(int(rollout_mask(b).sum()) for b in batches)).item()
        return batches, metrics

    def _watch_flat_rewards(self, zero_std_fraction: float, reward: float) -> None:
        """Warn when every group's completions got one reward for FLAT_WARN_EVERY rollouts in a row, and
        every FLAT_WARN_EVERY rollouts while it lasts: every advantage is 0, so nothing trains."""
        self.flat_rollouts = self.flat_rollouts + 1 if zero_std_fraction >= 1.0 else 0
        if self.flat_rollouts and self.flat_rollouts % FLAT_WARN_EVERY == 0:
            console.print(
                f"[bold yellow]warning:[/] for {self.flat_rollouts} rollouts in a row, every group's "
                f"{self.method.num_generations} completions got one same reward (mean {reward:.3g}): every "
                "advantage is 0 and nothing trains. Likely causes: the reward cannot read the answers "
                "(check the rewards/ metrics and the data's answer column), the prompts are too hard (all 0) "
                "or too easy (all right) for this model, method.max_new_tokens cuts the answers off, or "
                "method.temperature is too low for samples to differ",
                highlight=False,
                soft_wrap=True,
            )

    def _whiten_over_batch(self, batches: list[dict], kls: list[torch.Tensor] | None) -> None:
        """REINFORCE++: the advantages whitened over every completion token of the rollout; with
        kl_in_reward per token first, the reward minus beta x the k1 still to come in the completion."""
        masks = [rollout_mask(b) for b in batches]
        values = [b["advantages"] for b in batches]
        if kls is not None:
            values = [pg.kl_shaped_returns(v, k, mk, coef=self.method.beta) for v, k, mk in zip(values, kls, masks)]
        for batch, advantages in zip(batches, pg.batch_whiten(values, masks)):
            batch["advantages"] = advantages

    @torch.no_grad()
    def _precompute(self, model, batches: list[dict]) -> list[torch.Tensor] | None:
        """Old-policy and reference log-probs, once per rollout, for every iteration on it. With
        kl_in_reward the reference serves the reward instead of the loss: returns each micro-batch's
        per-token k1 (rollout policy - reference), else None."""
        m = self.method
        if m.num_iterations == 1 and m.beta == 0:
            return None
        was_training = model.training
        model.eval()
        kls = []
        try:
            for batch in batches:
                on_device = {k: v.to(self.device) for k, v in batch.items()}
                old = None
                if m.num_iterations > 1 or m.kl_in_reward:
                    old = token_logps(model, on_device, share_prompts=True)[0].cpu()
                if m.num_iterations > 1:
                    batch["old_logps"] = old
                if m.beta > 0:
                    ref = self.reference.run(model, lambda r: token_logps(r, on_device, share_prompts=True)[0]).cpu()
                    if m.kl_in_reward:
                        kls.append(pg.k1_kl(old, ref, rollout_mask(batch)))
                    else:
                        batch["ref_logps"] = ref
        finally:
            model.train(was_training)
        return kls if m.kl_in_reward else None


def rollout_mask(batch: dict) -> torch.Tensor:
    """[B, T] True on completion tokens, on the window token_logps gives the batch's log-probs."""
    return logits_window(batch["labels"])[1][:, 1:] != IGNORE_INDEX
