"""The judges of online DPO and RLAIF (polmctl/methods/online_dpo.py): what orders a prompt's k
sampled answers, built from the ``method`` node.

    polmctl run recipe=online_dpo                                       # method.judge=rewards
    polmctl run recipe=online_dpo method.judge=reward_model method.judge_model=<reward_model run dir>
    polmctl run recipe=rlaif method.judge_model=policy | reference | builtin:smollm2-135m | <model dir>

A judge is called as ``judge(model, rows, texts, k, batch_index)`` with the rollout's rows (one per
prompt) and their k answers each (consecutive), and returns one score per answer (higher is better,
NaN: none) and metrics for the log: a float is summed over a step's rollouts, a (sum, count) pair
averaged. Reward functions and a reward model score each answer on its own; an LLM judge
(polmctl/rollout/judges.py) runs on a model of its own, on the policy as it trains, or on the
reference (the model the run started from: no second copy).
"""

from __future__ import annotations

from typing import Callable

import torch

from polmctl.config.schema import ModelConfig
from polmctl.data.prompts import prompt_of
from polmctl.errors import ConfigError
from polmctl.methods.reference import Reference
from polmctl.rollout.judges import LLMJudge
from polmctl.rollout.rewards import CombinedReward, RewardModelScorer

POLICY, REFERENCE = "policy", "reference"  # judge_model values that name a model the run already holds


class RewardJudge:
    """Reward functions, or a reward model as one, score each answer on its own."""

    def __init__(self, reward: CombinedReward):
        self.reward = reward

    def __call__(self, model, rows: list[dict], texts: list[str], k: int, batch_index: int):
        expanded = [r for r in rows for _ in range(k)]
        skip = ("prompt", "messages", "completion")
        columns = {key: [r.get(key) for r in expanded] for key in expanded[0] if key not in skip}
        total, parts = self.reward([prompt_of(r) for r in expanded], texts, columns, batch_index=batch_index)
        return total, {f"rewards/{name}": (values.sum().item(), values.numel()) for name, values in parts.items()}


class ModelJudge:
    """An LLM judge run on a model: a separate one, the policy, or the reference."""

    def __init__(self, llm: LLMJudge, runner: Callable[[torch.nn.Module], Callable]):
        self.llm, self.runner = llm, runner

    def __call__(self, model, rows: list[dict], texts: list[str], k: int, batch_index: int):
        return self.llm.judge(self.runner(model), [prompt_of(r) for r in rows], texts, k)


def evaluating(model: torch.nn.Module) -> Callable:
    """Run a function of ``model`` in eval mode without gradients, leaving its mode as it was."""

    def run(fn):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model)
        finally:
            model.train(was_training)

    return run


def build_judge(method, *, tokenizer, model_cfg: ModelConfig, device, reference: Reference):
    """The judge ``method`` names, loaded, and a line for the run's log."""
    if method.judge == "rewards":
        reward = CombinedReward.from_specs(method.rewards)
        return RewardJudge(reward), f"judge: reward functions {', '.join(n for n, _, _ in reward.rewards)}"
    if method.judge == "reward_model":
        scorer = RewardModelScorer(method.judge_model, device=str(device))
        return RewardJudge(CombinedReward([("reward_model", scorer, 1.0)])), f"judge: reward model {method.judge_model}"
    if method.judge_model == POLICY:
        judge_tokenizer, runner, what = tokenizer, evaluating, "the policy as it trains"
    elif method.judge_model == REFERENCE:
        judge_tokenizer, what = tokenizer, "the model this run started from"

        def runner(model):
            return lambda fn: reference.run(model, fn)
    else:
        judge_tokenizer, judge_model = load_judge_model(method.judge_model, model_cfg, device)
        runner, what = (lambda _: evaluating(judge_model)), method.judge_model
    try:
        llm = LLMJudge(
            judge_tokenizer,
            mode=method.judge_mode,
            template=method.judge_template,
            swap=method.judge_swap,
            position=method.judge_position,
            min_label_prob=method.judge_min_label_prob,
            batch_size=method.judge_batch_size,
        )
    except ValueError as err:
        raise ConfigError("method.judge_model", f"{method.judge_model}: {err}") from None
    swap = f", both orders ({method.judge_position})" if method.judge_mode == "pairwise" and method.judge_swap else ""
    return ModelJudge(llm, runner), f"judge: {what}, {method.judge_mode}{swap}, by label probabilities"


def load_judge_model(name: str, model_cfg: ModelConfig, device):
    """The tokenizer and frozen causal LM of an LLM judge (the policy's model cache)."""
    from polmctl.models import load_model, load_tokenizer, model_head, resolve_model_path

    cfg = ModelConfig(name_or_path=name, cache_dir=model_cfg.cache_dir, dtype=model_cfg.dtype)  # as the policy
    if model_head(resolve_model_path(cfg.name_or_path, cfg.cache_dir)) == "reward":
        raise ConfigError(
            "method.judge_model",
            f"{name} is a reward model (a score head, no next-token distribution); use "
            "method.judge=reward_model for it, or give a causal LM to the llm judge",
        )
    tokenizer = load_tokenizer(cfg)
    return tokenizer, load_model(cfg, device=device, for_training=False, head="causal_lm")
