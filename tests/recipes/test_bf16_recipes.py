"""model.dtype=bfloat16 through every kind of training path on model=tiny: the frozen weights stay
bf16, everything that trains is float32 and moves, and the losses are finite float32 numbers.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/recipes/test_bf16_recipes.py
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.recipes.test_online_recipes import SHORT as ONLINE

pytestmark = pytest.mark.recipes

BF16 = ["model.dtype=bfloat16", "trainer.max_steps=2", "trainer.lr=1e-2", "trainer.scheduler=constant"]
OFFLINE = ["data.max_rows=8", "trainer.micro_batch_size=4", "trainer.grad_accum=1"]
ONLINE_SHORT = [o for o in ONLINE if not o.startswith(("trainer.max_steps", "trainer.lr", "trainer.scheduler"))]

CASES = {
    "lora": OFFLINE,
    "sft": OFFLINE,  # full fine-tuning: float32 weights, bf16 compute under autocast
    "dpo": OFFLINE,
    "kto": OFFLINE,
    "reward_model": OFFLINE,
    "prm": OFFLINE,
    "distill": [
        *OFFLINE,  # full fine-tuning too, against a bf16 teacher
        "method.teacher=builtin:tiny",
        "method.teacher_dtype=bfloat16",
        "method.on_policy_fraction=0",
    ],
    "grpo": ONLINE_SHORT,
    "ppo": ONLINE_SHORT,
}

FULL_FINE_TUNING = ("sft", "distill")


@pytest.mark.parametrize("recipe", list(CASES))
def test_a_bf16_run_trains_float32_parameters_on_bf16_weights(train_recipe, recipe):
    run = train_recipe(recipe, *BF16, *CASES[recipe])
    assert run.losses and all(math.isfinite(loss) for loss in run.losses)
    params = dict(run.model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    if recipe not in FULL_FINE_TUNING:
        frozen = [p for p in params.values() if not p.requires_grad and p.is_floating_point()]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert len(run.unchanged_parameters()) < len(trainable)  # it trained
