"""The policy-gradient recipes after GRPO (gspo, cispo, reinforce_pp) end to end on model=tiny with
the letter-"a" reward of test_online_recipes: weights change, the mean reward rises, and each
estimator leaves its own trace in the metrics."""

from __future__ import annotations

import pytest

from polmctl.engine.metrics import read_metrics
from tests.recipes.test_online_recipes import SHORT

pytestmark = pytest.mark.recipes


@pytest.fixture(autouse=True)
def _allow_test_rewards(monkeypatch):
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "tests")  # the reward _target_ lives in tests/ (polmctl/targets.py)


def rewards_rise(lines: list[dict]) -> None:
    rewards = [l["reward"] for l in lines]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.02, rewards


def test_gspo_trains_and_clips_whole_completions_off_policy(train_recipe):
    run = train_recipe("gspo", *SHORT, "trainer.max_steps=16")
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    rewards_rise(lines)
    # Iteration 1 of a rollout is on-policy (dropout off: ratio 1 to float precision); iteration 2 is
    # not, and GSPO's clip range of 3e-4 / 4e-4 drops whole completions there.
    assert all(l["ratio"] == pytest.approx(1.0, abs=1e-4) for l in lines[0::2])
    assert max(l["clip_ratio/region"] for l in lines[1::2]) > 0
    assert all(l["clip_ratio/region"] == 0 for l in lines[0::2])


def test_cispo_trains_with_capped_weights(train_recipe):
    run = train_recipe("cispo", *SHORT, "trainer.max_steps=16")
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    rewards_rise(lines)
    assert any(l["ratio"] != pytest.approx(1.0, abs=1e-4) for l in lines[1::2])  # iteration 2 reweights
    assert all(l["clip_ratio/low"] == 0 for l in lines)  # CISPO has no lower bound


def test_reinforce_pp_trains_with_the_kl_in_the_reward(train_recipe):
    run = train_recipe("reinforce_pp", *SHORT)
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    rewards_rise(lines)
    # LoRA starts as its reference (adapters zero): no KL at the first rollout, some once it moved.
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6) and lines[-1]["kl"] != pytest.approx(0.0, abs=1e-6)
