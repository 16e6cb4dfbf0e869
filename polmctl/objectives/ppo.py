"""PPO for RLHF (Ouyang et al., 2022; the loop of TRL's PPOTrainer): sample a completion
per prompt, score it with a reward model or reward functions, fold a per-token KL penalty
to the reference into the reward, estimate advantages with GAE from a value head, and train
the policy and the value head on clipped losses.

    polmctl run recipe=ppo
    polmctl run recipe=ppo "method.rewards=[{name: reward_model, path: outputs/reward_model/<date>/<time>}]"

The InstructGPT flow is three runs: ``recipe=sft`` (or lora) -> ``recipe=reward_model`` on
preference pairs -> ``recipe=ppo model.name_or_path=<sft run>/final`` with the reward model
above (docs/alignment.md).

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
with it, and is saved apart from the policy as final/value_head.safetensors. The rollout
(sampling, reference and value forward passes, GAE) is in polmctl/rollout/ppo.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import ConfigError, _f, positive
from polmctl.objectives import policy_gradient as pg
from polmctl.objectives.base import LossTerms, policy_forward
from polmctl.objectives.online import prompt_rows
from polmctl.rollout.sampling import ScoredSamplingOptions


@dataclass
class PPOMethod(ScoredSamplingOptions):
    objective: str = _f("ppo", "ppo: RLHF with a value head, GAE and a KL penalty folded into the reward")
    num_generations: int = _f(1, "completions sampled per prompt (each is scored on its own)")
    kl_coef: float = _f(0.05, "weight of the per-token KL penalty to the reference in the reward (0: no reference)")
    gamma: float = _f(1.0, "discount factor of GAE")
    lam: float = _f(0.95, "lambda of GAE (bias/variance trade-off of the advantages)")
    cliprange: float = _f(0.2, "clip range of the policy ratio")
    cliprange_value: float = _f(0.2, "clip range of the value prediction around the rollout's value")
    vf_coef: float = _f(0.1, "weight of the value loss")
    num_iterations: int = _f(4, "optimizer steps on each rollout batch (PPO epochs)")
    whiten_rewards: bool = _f(False, "scale the per-token rewards to unit variance (mean kept) before GAE")
    missing_eos_penalty: float = _f(0.0, "subtracted from the score of a completion that does not end with EOS")

    def check(self, section: str) -> None:
        self.check_sampling(section)
        for name in ("num_generations", "num_iterations", "cliprange", "cliprange_value"):
            positive(section, name, getattr(self, name))
        for name in ("kl_coef", "vf_coef", "missing_eos_penalty"):
            positive(section, name, getattr(self, name), zero_ok=True)
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{section}.{name}", f"must be in [0, 1], got {getattr(self, name)!r}")


class PPOObjective:
    """The loss on a batch of rollouts, a mean over completion tokens:

        clipped policy loss (per-token GAE advantages)  +  vf_coef * clipped value loss

    A batch (made by polmctl/rollout/ppo.py) holds input_ids / attention_mask / labels
    (labels only on completion tokens) and, [B, T] on token_logps' window, ``old_logps``,
    ``old_values``, ``advantages`` (whitened) and ``returns``.
    """

    def __init__(self, method: PPOMethod):
        self.method = method
        self.value_head: torch.nn.Linear | None = None

    def heads(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Modules the runner attaches to the model, so they train, checkpoint and resume with it."""
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
        return prompt_rows(rows, data.source)

    def weight(self, batch: dict) -> int:
        return pg.policy_loss_weight(batch["labels"][:, 1:] != -100, "dapo")  # completion tokens

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        m = self.method
        out = policy_forward(model, batch, entropy=True, hidden=True)
        mask = out.mask
        policy_sum, weight, metrics = pg.clipped_policy_loss(
            out.logps, batch["old_logps"].to(out.logps), batch["advantages"].to(out.logps), mask,
            epsilon_low=m.cliprange, epsilon_high=m.cliprange, loss_type="dapo")
        values = self.values(out.hidden)
        value_sum, _, value_metrics = pg.clipped_value_loss(values, batch["old_values"].to(values),
                                                            batch["returns"].to(values), mask,
                                                            clip_range=m.cliprange_value)
        tokens = mask.sum()
        metrics.update(value_metrics)
        metrics["loss/policy"] = (policy_sum.detach(), tokens)
        metrics["loss/value"] = (value_sum.detach(), tokens)
        metrics["entropy"] = (out.entropy.sum(), tokens)
        return LossTerms(loss_sum=policy_sum + m.vf_coef * value_sum, weight=weight, metrics=metrics)

    def make_batches(self, rows: list[dict], *, model, tokenizer, cfg, accelerator):
        """The trainer's batch source: scored rollouts with GAE targets (see rollout/ppo.py)."""
        from polmctl.rollout.ppo import PPORolloutBatches

        return PPORolloutBatches(rows, method=self.method, objective=self, tokenizer=tokenizer, trainer_cfg=cfg.trainer,
                                 seed=cfg.seed, shuffle=cfg.data.shuffle, accelerator=accelerator)
