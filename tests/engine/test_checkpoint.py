"""Atomic checkpoints, rotation, resume and what is never unpickled (polmctl/engine/checkpoint.py).

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/engine/test_checkpoint.py
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import polmctl.engine.checkpoint as ckpt
from polmctl.engine.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
    remove_interrupted_saves,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

pytestmark = pytest.mark.unit


class WritesAMarker:
    """What a crafted checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


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
    # Same names, other shapes (a changed lora rank): named, not a raw copy_ error.
    wider = torch.nn.Linear(4, 3)
    wider.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"weight \(3, 3\) vs \(3, 4\)"):
        load_checkpoint(tmp_path / "step-1", wider)


def test_trainer_state_loads_with_weights_only_and_restores_every_rng(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    random.random(), np.random.normal()  # a cached gaussian is part of numpy's state too
    save_checkpoint(tmp_path, 3, model, {"optimizer": opt.state_dict()}, keep_last=1)
    expected = (random.random(), np.random.normal(), torch.rand(2))
    torch.load(tmp_path / "step-3" / "trainer_state.pt", weights_only=True)  # no error: tensors and plain values
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = load_checkpoint(tmp_path / "step-3", model)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.normal()) == expected[:2] and torch.equal(torch.rand(2), expected[2])
    assert state["optimizer"]["state"][0]["exp_avg"].shape == (3, 3)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dumps"])
def test_a_crafted_trainer_state_is_refused_and_never_runs(tmp_path, how):
    save_checkpoint(tmp_path, 1, _model(), {}, keep_last=1)
    marker = tmp_path / "marker"
    path = tmp_path / "step-1" / "trainer_state.pt"
    if how == "torch.save":
        torch.save({"step": 1, "rng": WritesAMarker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(WritesAMarker(marker)))
    # torch names the global a zip checkpoint reaches for; a raw pickle (protocol 4) may fail on its opcodes first
    reason = r"it refers to (posix|os)\.system" + ("" if how == "torch.save" else r"|Unsupported operand")
    with pytest.raises(CheckpointError, match=rf"cannot be loaded safely \(({reason})"):
        load_checkpoint(tmp_path / "step-1", _model())
    assert not marker.exists()


def test_a_checkpoint_of_the_old_format_is_refused_with_what_to_do(tmp_path):
    save_checkpoint(tmp_path, 1, _model(), {}, keep_last=1)
    old = {"step": 1, "rng": {"python": random.getstate(), "numpy": np.random.get_state()}}  # numpy arrays, pickled
    torch.save(old, tmp_path / "step-1" / "trainer_state.pt")
    with pytest.raises(CheckpointError) as err:
        load_trainer_state(tmp_path / "step-1")
    message = str(err.value)
    assert "numpy" in message and "older polmctl" in message and "polmctl export" in message and "\n" not in message


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_a_full_disk_is_one_error_naming_the_path_and_free_space_and_leaves_no_temp_dir(tmp_path, monkeypatch, error):
    model = _model()
    save_checkpoint(tmp_path, 1, model, {}, keep_last=2)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"no space left on device writing checkpoint .*step-2 \([\d.]+ MiB free"):
        save_checkpoint(tmp_path, 2, model, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_ctrl_c_during_a_save_leaves_no_temp_dir(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _model(), {}, keep_last=2)
    assert list(tmp_path.iterdir()) == []


def test_temp_dirs_of_dead_processes_are_removed_and_a_live_ones_kept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = tmp_path / f"step-4.tmp-{int(gone.stdout)}", tmp_path / f"step-6.tmp-{os.getppid()}"
    dead.mkdir(), live.mkdir()
    (dead / "trainer_state.pt").write_bytes(b"half a file")
    notes = remove_interrupted_saves(tmp_path)
    assert not dead.exists() and live.exists()
    assert len(notes) == 1 and str(dead) in notes[0] and "interrupted checkpoint save" in notes[0]


def test_rng_state_is_plain():
    state = rng_state()
    assert isinstance(state["python"][1], torch.Tensor) and isinstance(state["numpy"]["key"], torch.Tensor)


def test_state_that_would_not_load_back_fails_at_save_naming_its_key(tmp_path):
    with pytest.raises(TypeError, match=r"trainer state.sampler.order is a numpy.ndarray"):
        save_checkpoint(tmp_path, 1, _model(), {"sampler": {"epoch": 0, "order": np.arange(3)}}, keep_last=1)
    assert list(tmp_path.iterdir()) == []
