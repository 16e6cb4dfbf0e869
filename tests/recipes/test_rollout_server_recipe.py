"""recipe=grpo sampling through a rollout server (method.generation_backend=vllm method.vllm_mode=server),
the server being `polmctl rollout-server builtin:tiny` with its transformers engine (no vLLM here):
the reward rises, which it can only if the server samples the policy as it trains.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/recipes/test_rollout_server_recipe.py
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from polmctl.engine.metrics import read_metrics
from tests.recipes.test_online_recipes import SHORT
from tests.rollout.serving import Server

pytestmark = pytest.mark.recipes


@pytest.fixture()
def server():
    started = Server("--engine", "transformers", "--idle-timeout", "600")
    yield started
    started.stop()


def test_grpo_through_a_rollout_server_raises_the_reward(train_recipe, server):
    server_keys = [
        "method.generation_backend=vllm",
        "method.vllm_mode=server",
        f"method.vllm_server_url={server.url}",
        "method.vllm_server_timeout=120",
    ]
    run = train_recipe("grpo", *SHORT, *server_keys)  # LoRA: the adapter is pushed after each step
    assert run.unchanged_parameters() == []
    rewards = [line["reward"] for line in read_metrics(run.dir / "metrics.jsonl")]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.02, rewards
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.url + "/health", timeout=30) as answer:
        health = json.loads(answer.read())
    # one push before each of the 15 rollouts (an update came before every one but the first)
    assert (health["version"], health["weights"]) == (15, "adapter")


def test_two_processes_sample_from_one_server_that_rank_0_keeps_in_sync(server, tmp_path):
    """DDP over 2 processes: rank 0 pushes once per update, both ranks learn the version from it and
    sample their own prompts (a rank sampling stale weights would be refused: 409)."""
    import sys

    from tests.recipes.test_multiprocess import _free_port, run_two_processes

    run_dir = tmp_path / "two"
    run_two_processes(
        [
            sys.executable,
            "-m",
            "polmctl",
            "run",
            "recipe=grpo",
            "model=tiny",
            "eval=none",
            "eval.tasks=[]",
            "logger.progress=false",
            "trainer.max_steps=3",
            "trainer.save_every=0",
            "trainer.micro_batch_size=4",
            "trainer.grad_accum=1",
            "method.num_generations=2",
            "method.max_new_tokens=8",
            "method.generation_backend=vllm",
            "method.vllm_mode=server",
            f"method.vllm_server_url={server.url}",
            "method.vllm_server_timeout=120",
            "launcher=accelerate",
            "launcher.num_processes=2",
            f"launcher.main_process_port={_free_port()}",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.url + "/health", timeout=30) as answer:
        assert json.loads(answer.read())["version"] == 3  # 3 rollouts, one push each (not one per rank)
