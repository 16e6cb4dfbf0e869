"""Online RL recipes end to end on model=tiny, with a reward the tiny model can learn (the
share of the letter "a" in its answer): weights change and the mean reward rises."""

from __future__ import annotations

import pytest
import torch

from polmctl.engine.metrics import read_metrics

pytestmark = pytest.mark.recipes


def letter_a(prompts, completions, **_):
    """A reward the random tiny model can climb: the share of 'a' in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def lowercase(prompts, completions, **_):
    """A denser reward than letter_a for PPO's one sample per prompt: the share of a-z."""
    return [sum(ch.islower() and ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


REWARD = f"method.rewards=[{{_target_: {__name__}.letter_a}}]"
# Among the 50 likeliest of the random model's 260 tokens a letter is common enough to learn in a
# few steps; from the full distribution (the default, top_k=0) it is too rare.
TOP_K = "method.top_k=50"
SHORT = [
    REWARD,
    TOP_K,
    "method.num_generations=4",
    "method.max_new_tokens=16",
    "trainer.max_steps=15",
    "trainer.lr=3e-3",
    "trainer.scheduler=constant",
    "trainer.micro_batch_size=16",
    "trainer.grad_accum=1",
]


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("grpo", []),
        ("rloo", []),
        ("grpo", ["method.loss_type=dapo", "method.epsilon_high=0.28", "method.dynamic_sampling=true"]),
        ("grpo", ["method.num_iterations=2", "method.beta=0.04"]),
    ],
    ids=["grpo", "rloo", "dapo", "grpo-2-iterations-kl"],
)
def test_online_recipe_raises_the_reward(train_recipe, recipe, extra):
    run = train_recipe(recipe, *SHORT, *extra)
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    rewards = [l["reward"] for l in lines]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.02, rewards
    for key in (
        "reward_std",
        "frac_reward_zero_std",
        "completion_length",
        "rollout_time_s",
        "rewards/letter_a",
        "clip_ratio/region",
    ):
        assert key in lines[0]
    if "method.beta=0.04" in extra:
        assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6) and lines[-1]["kl"] > 0
        # iteration 2 of each rollout is off-policy: the ratio moved away from 1
        assert any(l["ratio"] != pytest.approx(1.0, abs=1e-6) for l in lines[1::2])


def test_a_broken_reward_stops_the_run_naming_it(train_recipe):
    from polmctl.errors import RewardError

    with pytest.raises(RewardError, match="reward 'short' on batch 0 returned 1 values for 8 completions"):
        train_recipe(
            "grpo",
            f"method.rewards=[{{_target_: {__name__}.short, name: short}}]",
            "trainer.max_steps=1",
            "trainer.micro_batch_size=8",
            "trainer.grad_accum=1",
            "method.max_new_tokens=4",
        )


def short(prompts, completions, **_):
    return [1.0]


def test_steps_must_hold_whole_groups(train_recipe):
    from polmctl.errors import TrainingError

    with pytest.raises(TrainingError, match="not a multiple of method.num_generations=4"):
        train_recipe("grpo", "method.num_generations=4", "trainer.micro_batch_size=6", "trainer.grad_accum=1")


def test_rejection_sampling_fine_tunes_on_accepted_answers(train_recipe):
    run = train_recipe(
        "rejection_sampling",
        REWARD,
        TOP_K,
        "method.threshold=0.01",
        "method.num_samples=4",
        "method.prompts_per_round=8",
        "method.steps_per_round=3",
        "method.max_new_tokens=16",
        "trainer.max_steps=9",
        "trainer.lr=3e-3",
        "trainer.micro_batch_size=4",
    )
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    rounds = [l for l in lines if "round" in l]
    assert [l["step"] for l in rounds] == [1, 4, 7]  # a round every steps_per_round steps
    assert all(l["accepted_examples"] >= 1 and 0 < l["acceptance_rate"] <= 1 for l in rounds)
    assert rounds[-1]["reward"] > rounds[0]["reward"], rounds


def test_rejection_sampling_that_accepts_nothing_stops_clearly(train_recipe):
    from polmctl.errors import TrainingError

    with pytest.raises(TrainingError, match="3 rounds in a row accepted no answer"):
        train_recipe(
            "rejection_sampling",
            REWARD,
            "method.threshold=2.0",
            "method.prompts_per_round=4",
            "method.max_new_tokens=4",
            "trainer.max_steps=2",
        )


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_online_rl_with_a_reward_model_checkpoint(train_recipe, tmp_path, recipe):
    """The instructgpt-style chain: a reward_model run's final/ scores the policy's rollouts."""
    rm = train_recipe(
        "reward_model",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=4",
        "trainer.grad_accum=1",
        run_dir=tmp_path / "rm",
    )
    run = train_recipe(
        recipe,
        f"method.rewards=[{{name: reward_model, path: {rm.dir}}}]",
        "method.num_generations=4",
        "method.max_new_tokens=8",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=8",
        "trainer.grad_accum=1",
        run_dir=tmp_path / recipe,
    )
    lines = read_metrics(run.dir / "metrics.jsonl")
    assert len(lines) == 2 and all(l["reward_std"] > 0 for l in lines)  # real, varying scores
    assert lines[0]["rewards/reward_model"] == pytest.approx(lines[0]["reward"])


def test_ppo_raises_the_reward_and_trains_its_value_head(train_recipe):
    from safetensors.torch import load_file

    run = train_recipe(
        "ppo",
        f"method.rewards=[{{_target_: {__name__}.lowercase}}]",
        TOP_K,
        "method.max_new_tokens=16",
        "method.num_iterations=2",
        "trainer.max_steps=16",
        "trainer.lr=3e-3",
        "trainer.scheduler=constant",
        "trainer.micro_batch_size=16",
        "trainer.grad_accum=1",
    )
    assert run.unchanged_parameters() == []
    assert run.model.value_head.weight.abs().sum() > 0  # zero-initialised, so it trained
    lines = read_metrics(run.dir / "metrics.jsonl")
    rewards = [l["reward"] for l in lines]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.02, rewards
    for key in (
        "objective/kl",
        "objective/rlhf_reward",
        "loss/policy",
        "loss/value",
        "value/clip_ratio",
        "clip_ratio/region",
        "entropy",
        "completion_length",
        "rollout_time_s",
        "update_time_s",
    ):
        assert key in lines[0], key
    assert lines[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5) and lines[-1]["objective/kl"] != 0
    # The policy is saved as a plain adapter; the value head beside it.
    assert not any("value_head" in k for k in load_file(str(run.dir / "final" / "adapter_model.safetensors")))
    assert set(load_file(str(run.dir / "final" / "value_head.safetensors"))) == {"weight", "bias"}


def test_ppo_checkpoints_and_resumes_its_value_head(train_recipe, tmp_path):
    args = [
        f"method.rewards=[{{_target_: {__name__}.lowercase}}]",
        "method.max_new_tokens=8",
        "trainer.micro_batch_size=8",
        "trainer.grad_accum=1",
        "trainer.save_every=2",
        "trainer.max_steps=2",
    ]
    run = train_recipe("ppo", *args, run_dir=tmp_path / "ppo")
    trained = run.model.value_head.weight.detach().clone()
    assert trained.abs().sum() > 0
    # Resuming at the last checkpoint runs no step: the value head is exactly the one saved.
    resumed = train_recipe("ppo", *args, "resume=auto", run_dir=tmp_path / "ppo")
    assert resumed.summary["resumed_from"]
    assert torch.equal(resumed.model.value_head.weight.detach(), trained)
