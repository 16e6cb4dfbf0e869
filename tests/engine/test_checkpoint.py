"""Atomic checkpoints, rotation and resume (polmctl/engine/checkpoint.py)."""

from __future__ import annotations

import os

import pytest
import torch

from polmctl.engine.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint

pytestmark = pytest.mark.unit


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
