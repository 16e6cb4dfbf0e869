"""A full disk during a checkpoint write: one error naming the path and the free space, the partial
save removed, the earlier checkpoints intact and resumable (polmctl/engine/checkpoint.py).

Needs a small tmpfs (``mount -t tmpfs``: root or CAP_SYS_ADMIN); skipped with the reason elsewhere.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m reliability tests/reliability/test_disk_full.py
"""

from __future__ import annotations

import subprocess

import pytest

from polmctl.compose import compose_config
from polmctl.engine.checkpoint import CheckpointError, list_checkpoints
from polmctl.runners.train import run_train
from polmctl.validate import validate

from .conftest import ARGS

pytestmark = [pytest.mark.reliability, pytest.mark.recipes]


@pytest.fixture()
def small_disk(tmp_path):
    """A 1.5 MiB tmpfs: room for one checkpoint of the tiny model (1.1 MiB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here to make a small tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        done = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
            pytest.fail(f"{disk} was still in use after the run (a file left open?): {done.stderr.strip()}")


def test_a_full_disk_names_the_checkpoint_and_free_space_and_the_earlier_checkpoint_resumes(small_disk):
    run_dir = small_disk / "run"
    cfg = validate(compose_config([*ARGS, f"output_dir={run_dir}"]))
    with pytest.raises(CheckpointError) as err:
        run_train(cfg)
    message = str(err.value)
    assert f"no space left on device writing checkpoint {run_dir / 'checkpoints' / 'step-4'}" in message
    assert "MiB free on the file system of" in message and "\n" not in message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]  # no step-4.tmp-* left

    grown = subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    again = [*ARGS, "resume=auto", "trainer.keep_last=1", f"output_dir={run_dir}"]
    summary = run_train(validate(compose_config(again)))
    assert summary["resumed_from"].endswith("step-2") and summary["steps"] == 8
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-8"]
