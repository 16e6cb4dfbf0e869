"""Engine pieces: batch order, schedule, checkpoint atomicity and rotation."""

from __future__ import annotations

import os

import pytest
import torch

from polmctl.config.schema import TrainerConfig
from polmctl.engine.batches import BatchSampler
from polmctl.engine.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from polmctl.engine.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.unit


def test_batch_sampler_is_seeded_covers_each_epoch_and_resumes():
    a = BatchSampler(10, 3, seed=1)
    first_epoch = [a.next() for _ in range(3)]
    flat = sum(first_epoch, [])
    assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)  # 3 full batches, last partial dropped
    assert first_epoch == [BatchSampler(10, 3, seed=1).next() for _ in range(1)] + first_epoch[1:]
    assert BatchSampler(10, 3, seed=2).next() != first_epoch[0] or BatchSampler(10, 3, seed=3).next() != first_epoch[0]
    state = a.state_dict()
    upcoming = [a.next() for _ in range(4)]
    b = BatchSampler(10, 3, seed=1)
    b.load_state_dict(state)
    assert [b.next() for _ in range(4)] == upcoming
    assert a.epoch >= 1


def test_batch_sampler_shards_ranks_disjointly():
    r0 = BatchSampler(12, 2, seed=0, rank=0, world_size=2)
    r1 = BatchSampler(12, 2, seed=0, rank=1, world_size=2)
    for _ in range(3):
        assert not set(r0.next()) & set(r1.next())


def test_batch_sampler_rejects_too_few_rows():
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchSampler(3, 4, seed=0)


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


def _model():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3)
    m.bias.requires_grad_(False)
    return m


def test_checkpoint_round_trip_restores_trainable_weights_and_state(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, 5, model, {"sampler": {"epoch": 1, "cursor": 4}}, keep_last=2)
    original = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    state = load_checkpoint(tmp_path / "step-5", model)
    torch.testing.assert_close(model.weight, original)
    assert state["step"] == 5 and state["sampler"] == {"epoch": 1, "cursor": 4} and "rng" in state


def test_checkpoints_rotate_and_ignore_interrupted_saves(tmp_path):
    model = _model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {}, keep_last=2)
    (tmp_path / f"step-4.tmp-{os.getpid() + 1}").mkdir()  # a save killed half way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]


def test_resume_auto_finds_the_newest_checkpoint_or_none(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # a fresh run dir starts from scratch
    for step in (2, 10):
        save_checkpoint(tmp_path / "checkpoints", step, _model(), {}, keep_last=3)
    assert resolve_resume("auto", tmp_path).name == "step-10"  # numeric, not lexical, order
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "step-10"
    with pytest.raises(FileNotFoundError, match="not a checkpoint dir"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_a_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = _model()
    import polmctl.engine.checkpoint as ckpt

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 7, model, {}, keep_last=2)
    assert list_checkpoints(tmp_path) == []


def test_resume_from_a_mismatched_model_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, _model(), {}, keep_last=1)
    other = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match="same model and peft config"):
        load_checkpoint(tmp_path / "step-1", other)


def test_upcoming_rows_are_the_rows_the_next_batches_take_and_do_not_move_the_sampler():
    from polmctl.engine.batches import BatchSampler

    sampler = BatchSampler(10, 3, seed=1)
    sampler.next()
    upcoming = sampler.upcoming(4)  # crosses into the second epoch
    state = sampler.state_dict()
    taken = {i for _ in range(4) for i in sampler.next()}
    assert upcoming == sorted(taken) and state == {"epoch": 0, "cursor": 3}
