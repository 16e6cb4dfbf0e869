"""PPO for RLHF (Ouyang et al., 2022; the loop of TRL's PPOTrainer): sample a completion
per prompt, score it with a reward model or reward functions, fold a per-token KL penalty
to the reference into the reward, estimate advantages with GAE from a value head, and train
the policy and the value head on clipped losses.

    polmctl run recipe=ppo
    polmctl run recipe=ppo "method.rewards=[{name: reward_model, path: outputs/reward_model/<date>/<time>}]"

The InstructGPT flow is three runs: ``recipe=sft`` (or lora) -> ``recipe=reward_model`` on
preference pairs -> ``recipe=ppo model.name_or_path=<sft run>/final`` with the reward model
above (docs/alignment.md), or one: ``recipe=instructgpt``.

Features and the flag that controls each:
  rewards, weighted, each logged    method.rewards (a reward_model checkpoint and/or functions)
  KL penalty folded into the reward method.kl_coef (per token: -kl_coef (logp - ref_logp))
  GAE                               method.gamma, method.lam
  clipped policy / value losses     method.cliprange, method.cliprange_value, method.vf_coef
  PPO epochs on each rollout        method.num_iterations
  reward whitening, EOS penalty     method.whiten_rewards, method.missing_eos_penalty
  sampling                          method.temperature, method.top_p, method.max_new_tokens, method.stop
The value head is a linear layer on the policy's final hidden state (one shared backbone,
as TRL's AutoModelForCausalLMWithValueHead); it trains beside the policy, is checkpointed
with it, and is saved apart from the policy as final/value_head.safetensors.

Every ``method.num_iterations`` optimizer steps the batch source (``PPOBatches``) samples
completions of the next prompts, scores each (minus ``missing_eos_penalty`` when it did not end
with EOS), and, in one no-grad pass per micro-batch, computes what every PPO epoch on this
rollout reuses: old log-probs, old values and reference log-probs. Then per token, as TRL:

    r_t = -kl_coef (logp_t - ref_logp_t)  (+ the score on the last completion token)
    A, R = GAE(r, V; gamma, lam)          advantages whitened over the whole rollout
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import option, positive
from polmctl.data.prompts import completion_batches, prompt_rows
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError
from polmctl.losses import IGNORE_INDEX
from polmctl.losses import policy_gradient as pg
from polmctl.methods.rollouts import RolloutBatches
from polmctl.models.forward import policy_forward, token_logps
from polmctl.rollout.reward_data import check_reward_data
from polmctl.rollout.sampling import ScoredSamplingOptions, sample_and_score


@dataclass
class PPOMethod(ScoredSamplingOptions):
    name: str = option("ppo", "ppo: RLHF with a value head, GAE and a KL penalty folded into the reward")
    num_generations: int = option(1, "completions sampled per prompt (each is scored on its own)")
    kl_coef: float = option(0.05, "weight of the per-token KL penalty to the reference in the reward (0: no reference)")
    gamma: float = option(1.0, "discount factor of GAE")
    lam: float = option(0.95, "lambda of GAE (bias/variance trade-off of the advantages)")
    cliprange: float = option(0.2, "clip range of the policy ratio")
    cliprange_value: float = option(0.2, "clip range of the value prediction around the rollout's value")
    vf_coef: float = option(0.1, "weight of the value loss")
    num_iterations: int = option(4, "optimizer steps on each rollout batch (PPO epochs)")
    whiten_rewards: bool = option(False, "scale the per-token rewards to unit variance (mean kept) before GAE")
    missing_eos_penalty: float = option(0.0, "subtracted from the score of a completion that does not end with EOS")

    def check(self, section: str) -> None:
        self.check_sampling(section)
        for name in ("num_generations", "num_iterations", "cliprange", "cliprange_value"):
            positive(section, name, getattr(self, name))
        for name in ("kl_coef", "vf_coef", "missing_eos_penalty"):
            positive(section, name, getattr(self, name), zero_ok=True)
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{section}.{name}", f"must be in [0, 1], got {getattr(self, name)!r}")


class PPOObjective(Objective):
    """The loss on a batch of rollouts, a mean over completion tokens:

        clipped policy loss (per-token GAE advantages)  +  vf_coef * clipped value loss

    A batch (made by ``PPOBatches``) holds input_ids / attention_mask / labels (labels only on
    completion tokens) and, [B, T] on token_logps' window, ``old_logps``, ``old_values``,
    ``advantages`` (whitened) and ``returns``.
    """

    def __init__(self, method: PPOMethod):
        self.method = method
        self.value_head: torch.nn.Linear | None = None

    def heads(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        if self.value_head is None:
            hidden = model.config.get_text_config().hidden_size
            device = next(model.parameters()).device
            # Zero init: every value starts at 0, so the first advantages are the rewards' own.
            self.value_head = torch.nn.Linear(hidden, 1, device=device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        return {"value_head": self.value_head}

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.float()).squeeze(-1)

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        rows, stats = prompt_rows(rows, data.source)
        return rows, check_reward_data(rows, self.method.rewards, data.source, stats)  # before the model loads

    def weight(self, batch: dict) -> int:
        return pg.policy_loss_weight(batch["labels"][:, 1:] != IGNORE_INDEX, "dapo")  # completion tokens

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        m = self.method
        out = policy_forward(model, batch, entropy=True, hidden=True)
        mask = out.mask
        policy_sum, weight, metrics = pg.clipped_policy_loss(
            out.logps,
            batch["old_logps"].to(out.logps),
            batch["advantages"].to(out.logps),
            mask,
            epsilon_low=m.cliprange,
            epsilon_high=m.cliprange,
            loss_type="dapo",
        )
        values = self.values(out.hidden)
        value_sum, _, value_metrics = pg.clipped_value_loss(
            values, batch["old_values"].to(values), batch["returns"].to(values), mask, clip_range=m.cliprange_value
        )
        tokens = mask.sum()
        metrics.update(value_metrics)
        metrics["loss/policy"] = (policy_sum.detach(), tokens)
        metrics["loss/value"] = (value_sum.detach(), tokens)
        metrics["entropy"] = (out.entropy.sum(), tokens)
        return LossTerms(loss_sum=policy_sum + m.vf_coef * value_sum, weight=weight, metrics=metrics)

    def make_batches(self, examples: list[dict], *, model, tokenizer, cfg, accelerator) -> PPOBatches:
        return PPOBatches(
            examples,
            method=self.method,
            objective=self,
            tokenizer=tokenizer,
            trainer_cfg=cfg.trainer,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            accelerator=accelerator,
        )


class PPOBatches(RolloutBatches):
    """Scored rollouts with GAE targets, one every ``method.num_iterations`` optimizer steps."""

    def __init__(self, rows: list[dict], *, objective: PPOObjective, **options):
        super().__init__(rows, **options)
        self.objective = objective  # owns the value head

    def rollout(self, model) -> tuple[list[dict], dict[str, float]]:
        m, G = self.method, self.method.num_generations
        started = time.perf_counter()
        rows = [self.rows[i] for i in self.sampler.next()]
        ids, _, rewards, per_function = sample_and_score(
            model, self.tokenizer, self.reward, rows, G, m, batch_index=self.rollouts, backend=self.backend
        )
        self.rollouts += 1
        ended = torch.tensor([bool(c) and c[-1] == self.tokenizer.eos_token_id for c in ids])
        scores = rewards - m.missing_eos_penalty * (~ended).float()
        prompts = [ids for ids in self.prompt_ids(rows) for _ in range(G)]
        batches = completion_batches(
            prompts,
            ids,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            micro_batch_size=self.micro_batch_size,
            scores=scores,
        )

        kls = self._score_tokens(model, batches)
        masks = [b.pop("mask") for b in batches]
        if m.whiten_rewards:
            for b, r in zip(batches, _whiten_together([b["rewards"] for b in batches], masks, shift_mean=False)):
                b["rewards"] = r
        for b, mask in zip(batches, masks):
            b["advantages"], b["returns"] = pg.gae(b.pop("rewards"), b["old_values"], mask, gamma=m.gamma, lam=m.lam)
        for b, a in zip(batches, _whiten_together([b["advantages"] for b in batches], masks)):
            b["advantages"] = a

        kl = torch.cat([k.sum(dim=1) for k in kls])  # per completion, summed over its tokens
        lengths = torch.tensor([float(len(c)) for c in ids])
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "objective/kl": kl.mean().item(),
            "objective/non_score_reward": (-m.kl_coef * kl).mean().item(),
            "objective/rlhf_reward": (scores - m.kl_coef * kl).mean().item(),
            "frac_ended_with_eos": ended.float().mean().item(),
            "completion_length": lengths.mean().item(),
            "rollout_time_s": time.perf_counter() - started,
        }
        for name, values in per_function.items():
            metrics[f"rewards/{name}"] = values.mean().item()
        return batches, metrics

    @torch.no_grad()
    def _score_tokens(self, model, batches: list[dict]) -> list[torch.Tensor]:
        """Old log-probs and values, reference log-probs, and per-token rewards, once per rollout;
        returns each micro-batch's per-token KL (logp - ref_logp)."""
        m = self.method
        was_training = model.training
        model.eval()
        kls = []
        try:
            for batch in batches:
                scores = batch.pop("scores")
                on_device = {k: v.to(self.device) for k, v in batch.items()}
                out = policy_forward(model, on_device, hidden=True)
                mask = out.mask.cpu()
                batch["old_logps"] = out.logps.cpu()
                batch["old_values"] = (self.objective.values(out.hidden).cpu() * mask).float()
                if m.kl_coef > 0:
                    ref = self.reference.run(model, lambda r: token_logps(r, on_device, share_prompts=True)[0])
                    kl = (batch["old_logps"] - ref.cpu()) * mask
                else:
                    kl = torch.zeros_like(batch["old_logps"])
                rewards = -m.kl_coef * kl
                # The score lands on each completion's last token (the mask is prompt 0s, tokens 1s, padding 0s).
                last = mask.size(1) - 1 - mask.flip(1).int().argmax(dim=1)
                rewards[torch.arange(len(last)), last] += scores
                batch["rewards"], batch["mask"] = rewards, mask
                kls.append(kl)
        finally:
            model.train(was_training)
        return kls


def _whiten_together(tensors: list[torch.Tensor], masks: list[torch.Tensor], shift_mean: bool = True):
    """``pg.whiten`` with one mean and variance over the masked entries of every micro-batch
    (their widths differ, so they are flattened rather than stacked)."""
    flat = torch.cat([t[m] for t, m in zip(tensors, masks)])
    flat = pg.whiten(flat, torch.ones_like(flat), shift_mean)
    out, start = [], 0
    for t, m in zip(tensors, masks):
        whitened = torch.zeros_like(t)
        whitened[m] = flat[start : start + int(m.sum())]
        start += int(m.sum())
        out.append(whitened)
    return out
