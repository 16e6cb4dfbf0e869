"""A sharded checkpoint (torch.distributed.checkpoint) is read without unpickling anything but its
metadata classes, in one process (polmctl export) as in every rank (engine/checkpoint.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/engine/test_sharded_checkpoint.py
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from polmctl.engine.checkpoint import (
    SHARDED_DIR,
    CheckpointError,
    SafeCheckpointReader,
    TensorsOnlyPlanner,
    is_sharded_checkpoint,
    load_sharded_trainable,
)

pytestmark = pytest.mark.unit


def write(ckpt: Path, entries: dict) -> None:
    """What the FSDP2 ranks write, from one process."""
    dcp.save({"model": entries}, storage_writer=dcp.FileSystemWriter(ckpt / SHARDED_DIR), no_dist=True)


class WritesAMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def test_one_process_reads_the_shards_into_a_plain_model(tmp_path):
    trained = torch.nn.Linear(3, 2)
    write(tmp_path, dict(trained.state_dict()))
    assert is_sharded_checkpoint(tmp_path)
    fresh = torch.nn.Linear(3, 2)
    load_sharded_trainable(tmp_path, fresh)
    torch.testing.assert_close(fresh.state_dict(), trained.state_dict(), rtol=0, atol=0)

    with pytest.raises(ValueError, match="does not match this model's parameters .*unexpected \\['bias', 'weight'\\]"):
        load_sharded_trainable(tmp_path, torch.nn.Sequential(torch.nn.Linear(3, 2)))


def test_crafted_metadata_is_refused_and_never_runs(tmp_path):
    write(tmp_path, dict(torch.nn.Linear(3, 2).state_dict()))
    marker = tmp_path / "pwned"
    (tmp_path / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(WritesAMarker(marker)))
    with pytest.raises(CheckpointError, match="posix.system in a sharded checkpoint's .metadata|os.system"):
        load_sharded_trainable(tmp_path, torch.nn.Linear(3, 2))
    assert not marker.exists()


def test_a_non_tensor_entry_is_refused(tmp_path):
    """torch would read it with torch.load(weights_only=False); polmctl writes tensors only. (torch's
    loader wraps the error in its CheckpointException, with polmctl's message.)"""
    write(tmp_path, {"weight": torch.zeros(2), "note": "hello"})
    with pytest.raises(CheckpointException, match="non-tensor entry \\(model.note\\); polmctl writes tensors only"):
        dcp.load(
            {"model": {"note": ""}},
            storage_reader=SafeCheckpointReader(tmp_path / SHARDED_DIR),
            planner=TensorsOnlyPlanner(),
            no_dist=True,
        )
