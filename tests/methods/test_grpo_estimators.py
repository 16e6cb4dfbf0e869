"""The GRPO family's rollout on the tiny model for the estimators after GRPO: REINFORCE++'s
advantages (the KL folded into the reward, whitened over the rollout's tokens) against
hand-computed returns, and the option combinations the schema refuses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError
from polmctl.methods.grpo import GRPOBatches, GRPOMethod, GRPOObjective, rollout_mask
from polmctl.models import load_model, load_tokenizer
from polmctl.models.forward import token_logps

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
REWARDS = [1.0, 0.0, 0.5, 0.5, 2.0, 1.0]


@pytest.fixture(autouse=True)
def _allow_test_rewards(monkeypatch):
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "tests")  # a reward _target_ outside polmctl (polmctl/targets.py)


def fixed_rewards(prompts, completions, **_):
    return REWARDS[: len(completions)]


def make_rollout(**method_kwargs):
    tok = load_tokenizer(TINY)
    model = load_model(TINY)
    method = GRPOMethod(
        rewards=[{"_target_": f"{__name__}.fixed_rewards"}],
        **{"num_generations": 2, "max_new_tokens": 6, "top_k": 50, **method_kwargs},
    )
    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(4)]
    source = GRPOBatches(
        rows,
        method=method,
        tokenizer=tok,
        trainer_cfg=SimpleNamespace(micro_batch_size=3, grad_accum=2, max_steps=1),  # a group split across the two
        seed=0,
        shuffle=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1),
    )
    return source, model


def population_whiten(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


REINFORCE_PP = {"baseline": "none", "scale_rewards": "none", "advantage": "batch", "kl_in_reward": True}


def test_reinforce_pp_advantages_are_kl_shaped_returns_whitened_over_the_rollout(monkeypatch):
    """With logp - ref_logp = 0.5 on every token and beta 0.1, token t of a completion of n tokens
    returns r - 0.1 * 0.5 * (n - t); those returns, whitened over all tokens of both micro-batches."""
    source, model = make_rollout(**REINFORCE_PP, beta=0.1, loss_type="dapo")
    monkeypatch.setattr(source.reference, "run", lambda model, fn, **kw: fn(model) - 0.5)
    batches, metrics = source.next_step(model)
    assert [b["input_ids"].size(0) for b in batches] == [3, 3]
    returns, rows = [], iter(REWARDS)
    for batch in batches:
        mask = rollout_mask(batch)
        assert batch["advantages"].shape == mask.shape and "ref_logps" not in batch and "old_logps" not in batch
        assert torch.all(batch["advantages"][~mask] == 0)
        for row in range(mask.size(0)):
            n, reward = int(mask[row].sum()), next(rows)
            returns += [reward - 0.1 * 0.5 * (n - t) for t in range(n)]
    got = torch.cat([b["advantages"][rollout_mask(b)] for b in batches])
    torch.testing.assert_close(got, torch.tensor(population_whiten(returns)))
    assert metrics["kl"] == pytest.approx(0.5, rel=1e-5)


def test_reinforce_pp_baseline_whitens_the_centred_rewards_per_completion():
    """REINFORCE++-baseline without KL: r_i - mean of its group, each completion's advantage counted
    once per token in the whitening, one advantage per completion kept."""
    source, model = make_rollout(baseline="mean", scale_rewards="none", advantage="batch")
    batches, _ = source.next_step(model)
    centred = [0.5, -0.5, 0.0, 0.0, 0.5, -0.5]  # groups [1, 0], [.5, .5], [2, 1]
    lengths = [int(n) for b in batches for n in rollout_mask(b).sum(dim=1)]
    tokens = [a for a, n in zip(centred, lengths) for _ in range(n)]
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((x - mean) ** 2 for x in tokens) / len(tokens))
    got = torch.cat([b["advantages"] for b in batches])
    assert got.dim() == 1
    torch.testing.assert_close(got, torch.tensor([(a - mean) / std for a in centred]))


def test_the_reinforce_pp_loss_has_no_k3_term():
    source, model = make_rollout(**REINFORCE_PP, beta=0.1, loss_type="dapo")
    batches, _ = source.next_step(model)
    terms = GRPOObjective(source.method)(model, batches[0])
    assert "kl" not in terms.metrics and torch.isfinite(terms.loss_sum)
    assert terms.weight == int(rollout_mask(batches[0]).sum())


def test_kl_in_the_reward_uses_the_rollout_policy_and_the_reference():
    """No monkeypatching: the reference is a frozen copy of the start, the policy moved since."""
    source, model = make_rollout(**REINFORCE_PP, beta=0.1, loss_type="dapo")
    source.reference.freeze(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batches, metrics = source.next_step(model)
    model.eval()
    k1 = []
    for batch in batches:
        with torch.no_grad():
            old = token_logps(model, batch)[0]
            ref = token_logps(source.reference.frozen, batch)[0]
        k1.append((old - ref)[rollout_mask(batch)])
    assert metrics["kl"] == pytest.approx(torch.cat(k1).mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["kl"] != 0


@pytest.mark.parametrize(
    "kwargs, key, hint",
    [
        ({"loss_type": "cispo", "importance_level": "sequence_mean"}, "importance_level", "use token"),
        ({"baseline": "none", "scale_rewards": "none"}, "baseline", "advantage=batch"),
        ({"baseline": "none", "advantage": "batch"}, "baseline", "scale_rewards=none"),
        ({"kl_in_reward": True, "beta": 0.1}, "kl_in_reward", "advantage=batch"),
        (
            {"kl_in_reward": True, "beta": 0.1, "advantage": "batch", "importance_level": "sequence"},
            "kl_in_reward",
            "importance_level=token",
        ),
        ({"kl_in_reward": True, "advantage": "batch"}, "kl_in_reward", "method.beta is 0"),
        ({"advantage": "global"}, "advantage", "group, batch"),
        ({"importance_level": "gspo"}, "importance_level", "sequence_mean"),
    ],
)
def test_meaningless_combinations_are_refused_naming_the_key(kwargs, key, hint):
    with pytest.raises(ConfigError) as info:
        GRPOMethod(**kwargs).check("method")
    assert info.value.key == f"method.{key}" and hint in str(info.value)
