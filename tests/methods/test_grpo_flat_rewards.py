"""GRPO's rollouts on the tiny model: a run whose groups all score alike says so, once every
FLAT_WARN_EVERY rollouts, naming the likely causes.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/methods/test_grpo_flat_rewards.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.methods.grpo import FLAT_WARN_EVERY, GRPOBatches, GRPOMethod
from polmctl.models import load_model, load_tokenizer

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
SCORES = {"value": 0.0}


def set_score(prompts, completions, **_):
    """Every completion the same reward while SCORES['value'] is a number; alternating 0/1 when None."""
    if SCORES["value"] is None:
        return [float(i % 2) for i in range(len(completions))]
    return [SCORES["value"]] * len(completions)


def make_source():
    tok = load_tokenizer(TINY)
    model = load_model(TINY)
    method = GRPOMethod(rewards=[{"_target_": f"{__name__}.set_score"}], num_generations=2, max_new_tokens=3)
    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(4)]
    source = GRPOBatches(
        rows,
        method=method,
        tokenizer=tok,
        trainer_cfg=SimpleNamespace(micro_batch_size=4, grad_accum=1),
        seed=0,
        shuffle=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1),
    )
    return source, model


def warnings_in(text: str) -> int:
    return text.count("rollouts in a row, every group's")


def test_zero_variance_rollouts_warn_once_then_every_n(capsys):
    source, model = make_source()
    SCORES["value"] = 0.0
    for _ in range(FLAT_WARN_EVERY - 1):
        assert source.next_step(model)[1]["frac_reward_zero_std"] == 1.0
    assert warnings_in(capsys.readouterr().err) == 0
    source.next_step(model)
    err = capsys.readouterr().err
    assert warnings_in(err) == 1
    assert f"for {FLAT_WARN_EVERY} rollouts in a row" in err and "nothing trains" in err
    assert "the reward cannot read the answers" in err and "method.temperature" in err
    for _ in range(FLAT_WARN_EVERY):
        source.next_step(model)
    assert warnings_in(capsys.readouterr().err) == 1  # at 2 x FLAT_WARN_EVERY, not on every step between


def test_a_rollout_with_variance_resets_the_count(capsys):
    source, model = make_source()
    SCORES["value"] = 1.0
    for _ in range(FLAT_WARN_EVERY - 1):
        source.next_step(model)
    SCORES["value"] = None  # one informative rollout
    assert source.next_step(model)[1]["frac_reward_zero_std"] == 0.0
    SCORES["value"] = 1.0
    for _ in range(FLAT_WARN_EVERY - 1):
        source.next_step(model)
    assert warnings_in(capsys.readouterr().err) == 0
