"""The optimizer and schedule (polmctl/engine/optim.py)."""

from __future__ import annotations

import pytest
import torch

from polmctl.config.schema import TrainerConfig
from polmctl.engine.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.unit


def test_warmup_then_cosine_schedule():
    model = torch.nn.Linear(2, 2)
    cfg = TrainerConfig(max_steps=10, lr=1.0, warmup_steps=2, scheduler="cosine")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.1


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    opt = build_optimizer(model, TrainerConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
