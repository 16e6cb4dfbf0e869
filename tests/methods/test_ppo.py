"""PPO's rollout on the tiny model: where the score lands, how the KL penalty is folded into
the per-token reward, and the GAE targets, checked against hand-computed returns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.methods.ppo import PPOBatches, PPOMethod, PPOObjective
from polmctl.models import load_model, load_tokenizer

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
SCORES = [1.0, 2.0, 3.0, 4.0]


def fixed_scores(prompts, completions, **_):
    return SCORES[: len(completions)]


def make_rollout(**method_kwargs):
    tok = load_tokenizer(TINY)
    model = load_model(TINY)
    method = PPOMethod(rewards=[{"_target_": f"{__name__}.fixed_scores"}], **{"max_new_tokens": 6, **method_kwargs})
    objective = PPOObjective(method)
    for name, head in objective.heads(model).items():
        model.add_module(name, head)
    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(4)]
    source = PPOBatches(
        rows,
        method=method,
        objective=objective,
        tokenizer=tok,
        trainer_cfg=SimpleNamespace(micro_batch_size=2, grad_accum=2),
        seed=0,
        shuffle=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1),
    )
    return source, model


def completion_mask(batch):
    return batch["labels"][:, 1:][:, -batch["old_logps"].size(1) :] != -100


def test_without_kl_every_token_returns_its_completions_score():
    """Values start at 0 (zero-init head); gamma = lam = 1 and no KL: R_t = score for every t."""
    source, model = make_rollout(kl_coef=0.0, gamma=1.0, lam=1.0)
    batches, metrics = source.next_step(model)
    assert len(batches) == 2 and metrics["reward"] == pytest.approx(2.5)
    scores = iter(SCORES)
    for batch in batches:
        mask = completion_mask(batch)
        assert torch.all(batch["old_values"] == 0)
        for row in range(mask.size(0)):
            score = next(scores)
            assert torch.allclose(batch["returns"][row][mask[row]], torch.tensor(score))
            assert torch.all(batch["returns"][row][~mask[row]] == 0)
    # advantages are whitened over all completion tokens of the rollout
    advantages = torch.cat([b["advantages"][completion_mask(b)] for b in batches])
    assert advantages.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert advantages.std().item() == pytest.approx(1.0, abs=1e-3)


def test_the_kl_penalty_is_folded_into_every_tokens_reward(monkeypatch):
    """With logp - ref_logp = 1 on every token: r_t = -kl_coef (+ score on the last token), so
    with gamma = lam = 1 and V = 0, R_t = score - kl_coef * (tokens from t to the end)."""
    source, model = make_rollout(kl_coef=0.1, gamma=1.0, lam=1.0)
    monkeypatch.setattr(source.reference, "run", lambda model, fn, **kw: fn(model) - 1.0)
    batches, metrics = source.next_step(model)
    scores = iter(SCORES)
    lengths = []
    for batch in batches:
        mask = completion_mask(batch)
        for row in range(mask.size(0)):
            n = int(mask[row].sum())
            lengths.append(n)
            expected = next(scores) - 0.1 * torch.arange(n, 0, -1, dtype=torch.float32)
            assert torch.allclose(batch["returns"][row][mask[row]], expected, atol=1e-5)
    assert metrics["objective/kl"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-4)
    assert metrics["objective/rlhf_reward"] == pytest.approx(2.5 - 0.1 * sum(lengths) / len(lengths), rel=1e-4)


def test_a_missing_eos_costs_the_penalty():
    source, model = make_rollout(kl_coef=0.0, gamma=1.0, lam=1.0, missing_eos_penalty=10.0, max_new_tokens=1)
    batches, metrics = source.next_step(model)
    # one new token: almost surely not EOS for the random tiny model, so every score drops by 10
    ended = metrics["frac_ended_with_eos"]
    assert metrics["objective/rlhf_reward"] == pytest.approx(2.5 - 10.0 * (1 - ended))
