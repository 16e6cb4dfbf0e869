"""kill -9 during a checkpoint write and at a random point, then resume=auto: the same loss curve as a
run never interrupted, the killed save's temp dir removed and the killed run's lock taken over.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m reliability tests/reliability/test_kill_and_resume.py
"""

from __future__ import annotations

import json
import random
import signal
import time

import pytest

from polmctl.engine.rundir import LOCK_FILE, read_holder

from .conftest import Run, losses

pytestmark = [pytest.mark.reliability, pytest.mark.recipes]

# polmctl run, whose torch.save writes a few bytes of step 4's trainer_state.pt and is then killed -9.
DIES_IN_SAVE = """
import os, signal, sys
import torch

real_save = torch.save

def save_then_die(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 4:
        with open(f, "wb") as out:
            out.write(b"PK\\x03\\x04 half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
from polmctl.entry import main

main(sys.argv[1:])
"""


def test_kill_9_in_a_checkpoint_write_and_at_a_random_point_then_resume_gives_the_same_curve(
    tmp_path, cache, reference
):
    run_dir = tmp_path / "run"
    killed = Run(run_dir, cache=cache, script=DIES_IN_SAVE)
    code, out = killed.wait()
    assert code == -signal.SIGKILL, out[-4000:]
    partial = run_dir / "checkpoints" / f"step-4.tmp-{killed.pid}"
    assert (partial / "trainer_state.pt").read_bytes().endswith(b"half a file")
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p != partial] == ["step-2"]
    assert read_holder(run_dir).pid == killed.pid  # kill -9 left its lock file (not its lock)

    # Resume, and kill -9 again at a random moment of the step after a random step (a step, a save, anything).
    rng = random.Random()
    step, fraction = rng.randint(5, 7), rng.random()
    resumed = Run(run_dir, "resume=auto", cache=cache)
    resumed.until(lambda: max(resumed.logged_steps(), default=0) >= step, f"step {step}")
    delay = fraction * resumed.logged()[-1]["step_time_s"]
    time.sleep(delay)
    resumed.signal(signal.SIGKILL)
    code, out = resumed.wait()
    where = f"(killed after step {step} + {delay:.3f} s)"
    assert code == -signal.SIGKILL, where + out[-4000:]
    assert f"took over {run_dir / LOCK_FILE}" in out and f"pid {killed.pid} " in out, out[-4000:]
    assert f"removed {partial}: an interrupted checkpoint save" in out and not partial.exists(), out[-4000:]

    final = Run(run_dir, "resume=auto", cache=cache)
    code, out = final.wait()
    assert code == 0, where + out[-4000:]
    assert f"pid {resumed.pid} " in out  # the second killed run's lock, taken over too
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["resumed_from"], where
    assert losses(run_dir) == pytest.approx(reference(), rel=1e-6, abs=1e-7), where
    assert not list((run_dir / "checkpoints").glob("*.tmp-*")) and not (run_dir / LOCK_FILE).exists()
