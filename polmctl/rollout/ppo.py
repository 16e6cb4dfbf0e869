"""The rollout phase of PPO, as a batch source for the one training engine.

    polmctl run recipe=ppo method.kl_coef=0.1 method.num_iterations=2

Every ``method.num_iterations`` optimizer steps: take the next prompts (micro_batch_size x
grad_accum / num_generations of them), sample completions with the current policy, score
each with the reward functions or reward model (minus ``missing_eos_penalty`` when it did not
end with EOS), and, in one no-grad pass per micro-batch, compute what every PPO epoch on
this rollout reuses: old log-probs, old values (the value head) and reference log-probs
(adapter-disabled model with LoRA). Then per token, as TRL's PPOTrainer:

    r_t = -kl_coef (logp_t - ref_logp_t)  (+ the score on the last completion token)
    A, R = GAE(r, V; gamma, lam)          advantages whitened over the whole rollout
"""

from __future__ import annotations

import time

import torch

from polmctl.objectives import policy_gradient as pg
from polmctl.objectives.base import policy_forward
from polmctl.rollout.online import RolloutBatches, sample_and_score


class PPORolloutBatches(RolloutBatches):
    def __init__(self, rows: list[dict], *, method, objective, tokenizer, trainer_cfg, seed: int, shuffle: bool,
                 accelerator):
        super().__init__(rows, method=method, tokenizer=tokenizer, trainer_cfg=trainer_cfg, seed=seed,
                         shuffle=shuffle, accelerator=accelerator)
        self.objective = objective  # owns the value head

    def _rollout(self, model) -> tuple[list[dict], dict[str, float]]:
        m, G = self.method, self.method.num_generations
        started = time.perf_counter()
        prompt_rows = [self.rows[i] for i in self.sampler.next()]
        ids, _, rewards, per_function = sample_and_score(model, self.tokenizer, self.reward, prompt_rows, G, m,
                                                         batch_index=self.rollouts, backend=self.backend)
        self.rollouts += 1
        ended = torch.tensor([bool(c) and c[-1] == self.tokenizer.eos_token_id for c in ids])
        scores = rewards - m.missing_eos_penalty * (~ended).float()
        batches = self._micro_batches([r for r in prompt_rows for _ in range(G)], ids, scores=scores)

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
        metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                   "objective/kl": kl.mean().item(), "objective/non_score_reward": (-m.kl_coef * kl).mean().item(),
                   "objective/rlhf_reward": (scores - m.kl_coef * kl).mean().item(),
                   "frac_ended_with_eos": ended.float().mean().item(), "completion_length": lengths.mean().item(),
                   "rollout_time_s": time.perf_counter() - started}
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
                    kl = (batch["old_logps"] - self._reference_logps(model, on_device).cpu()) * mask
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
