"""One run at a time in a run dir (polmctl/engine/rundir.py, runners/common.py held_run_dir, entry.py):
a second run stops at once naming the holder, a killed holder's lock is taken over, Ctrl-C says
where the last checkpoint is and how to resume, and summary.json / ``polmctl runs`` say how a run ended.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m reliability tests/reliability/test_run_dir_lock.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polmctl.commands.runs import read_run
from polmctl.engine.rundir import LOCK_FILE, RunDirBusy, RunDirLock, read_holder
from polmctl.errors import ConfigError, DataError
from polmctl.runners.common import held_run_dir

from .conftest import Run, losses

pytestmark = [pytest.mark.reliability, pytest.mark.recipes]

HOLD = """
import sys, time
from pathlib import Path
from polmctl.engine.rundir import RunDirLock
RunDirLock(Path(sys.argv[1]), "polmctl run recipe=sft", {".hydra/config.yaml": "recipe: mine\\n"}).acquire()
print("held", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def hold(run_dir: Path):
    """Another process that holds ``run_dir``'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=60)


@pytest.fixture()
def holder(tmp_path):
    with hold(tmp_path / "run") as proc:
        yield proc


def test_a_held_dir_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, holder):
    run_dir = tmp_path / "run"
    busy = rf"in use by another polmctl run \(pid {holder.pid} on .*: polmctl run recipe=sft"
    with pytest.raises(RunDirBusy, match=busy):
        RunDirLock(run_dir, "second").acquire()
    holder.kill()
    holder.wait(timeout=60)  # kill -9: it released nothing itself, the kernel dropped its flock
    assert read_holder(run_dir).pid == holder.pid and read_holder(run_dir).alive() is False
    with RunDirLock(run_dir, "third") as lock:
        assert lock.taken_over.pid == holder.pid
        assert read_holder(run_dir).pid == os.getpid() and read_holder(run_dir).alive()
    assert not (run_dir / LOCK_FILE).exists()  # released: nothing left to take over
    with RunDirLock(run_dir, "fourth") as lock:
        assert lock.taken_over is None


def test_a_refused_run_puts_back_the_holders_hydra_files(tmp_path, holder):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("recipe: theirs\n")  # what the refused run's Hydra wrote
    (run_dir / ".hydra" / "overrides.yaml").write_text("- recipe=theirs\n")
    with pytest.raises(RunDirBusy):
        with held_run_dir(run_dir, "polmctl run recipe=theirs"):
            pytest.fail("the body of a refused run ran")
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "recipe: mine\n"
    assert not (run_dir / ".hydra" / "overrides.yaml").exists()  # the holder had none
    assert not (run_dir / "summary.json").exists()


def test_a_failed_run_says_so_and_keeps_a_completed_summary_it_replaces(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("recipe: {name: sft}\n")
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "final_loss": 1.5}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    with pytest.raises(DataError):
        with held_run_dir(run_dir, "polmctl run"):
            raise DataError("data.source: missing.jsonl does not exist\nsecond line")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 2
    assert summary["error"] == "DataError: data.source: missing.jsonl does not exist second line"
    assert summary["previous"]["final_loss"] == 1.5
    assert read_run(run_dir).status == "failed" and not (run_dir / LOCK_FILE).exists()

    # A run refused before it started (a config error) leaves the dir as it was.
    with pytest.raises(ConfigError):
        with held_run_dir(run_dir, "polmctl run"):
            raise ConfigError("resume", "vlm runs do not resume yet")
    assert json.loads((run_dir / "summary.json").read_text()) == summary


def test_a_pipeline_stage_holds_its_own_dir(tmp_path):
    from omegaconf import OmegaConf

    from polmctl.compose import compose_config
    from polmctl.runners.pipeline import StageError, run_pipeline
    from polmctl.validate import validate

    cfg = compose_config(["recipe=domain_adaptation", "model=tiny", f"output_dir={tmp_path / 'pipe'}"])
    stage = {"name": "sft", "recipe": "sft", "overrides": ["trainer.max_steps=1", "data.max_rows=8"]}
    cfg.method = OmegaConf.merge(cfg.method, {"stages": [stage], "common": ["eval.tasks=[]"]})
    with hold(tmp_path / "pipe" / "1-sft") as other:
        with pytest.raises(StageError, match=rf"stage 1/1 'sft' .*RunDirBusy: .*1-sft is in use .*pid {other.pid}"):
            run_pipeline(validate(cfg))
    assert not (tmp_path / "pipe" / "1-sft" / "summary.json").exists()  # the stage never started


def test_runs_shows_a_live_run_as_running(tmp_path, holder):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("recipe: {name: sft}\n")
    assert read_run(run_dir).status == "running"
    holder.kill()
    holder.wait(timeout=60)
    assert read_run(run_dir).status == "incomplete"  # killed -9: nothing written, as before


def test_a_second_run_stops_at_once_and_ctrl_c_says_how_to_resume(tmp_path, cache, reference):
    run_dir = tmp_path / "run"
    first = Run(run_dir, "trainer.max_steps=1000", cache=cache)  # still running whenever it is stopped
    first.until(lambda: getattr(read_holder(run_dir), "pid", None) == first.pid, "the lock taken")
    first.signal(signal.SIGSTOP)  # held, and kept from finishing while the others try
    recorded = {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()}
    second, resuming = Run(run_dir, cache=cache), Run(run_dir, "resume=auto", cache=cache)
    for other in (second, resuming):
        code, out = other.wait()
        assert code == 1 and f"RunDirBusy: {run_dir} is in use by another polmctl run (pid {first.pid}" in out, out
        assert "Traceback" not in out and "data builtin" not in out  # stopped before loading anything
    assert {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()} == recorded
    assert not (run_dir / "summary.json").exists()

    first.signal(signal.SIGCONT)
    first.until(lambda: (run_dir / "checkpoints" / "step-2").is_dir(), "checkpoint step-2")
    first.signal(signal.SIGINT)
    code, out = first.wait()
    assert code == 130, out[-4000:]
    [line] = [line for line in out.splitlines() if line.startswith("interrupted:")]
    last = line.split("last checkpoint ", 1)[1].split(";")[0]
    assert Path(last).parent == run_dir / "checkpoints" and Path(last).is_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["last_checkpoint"] == last
    assert summary["steps"] == first.logged_steps()[-1] >= 2
    assert read_run(run_dir).status == "interrupted"
    assert not (run_dir / LOCK_FILE).exists() and not list((run_dir / "checkpoints").glob("*.tmp-*"))

    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["polmctl", "run"] and command[-2:] == ["resume=auto", f"hydra.run.dir={run_dir}"]
    assert "trainer.max_steps=1000" in command  # the interrupted run's own overrides; here it ends at 8
    command = [("trainer.max_steps=8" if arg == "trainer.max_steps=1000" else arg) for arg in command]
    resumed = subprocess.run(
        [sys.executable, "-m", "polmctl", *command[1:]],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "POLMCTL_CACHE": str(cache)},
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "completed" and done["resumed_from"] == last
    assert losses(run_dir) == pytest.approx(reference(), rel=1e-6, abs=1e-7)
    assert read_run(run_dir).status == "completed"


def test_an_error_line_keeps_its_brackets(capsys):
    from polmctl.entry import fail

    with pytest.raises(SystemExit) as done:
        fail("RunDirBusy", "outputs/x is in use (pid 7: polmctl run 'eval.tasks=[arithmetic]' data.options={n: 2})", 1)
    assert done.value.code == 1
    assert "polmctl run 'eval.tasks=[arithmetic]'" in capsys.readouterr().err  # not read as rich markup


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path, cache):
    """What Slurm sends at its time limit: summary.json "interrupted", the resume line, the lock released."""
    run_dir = tmp_path / "run"
    run = Run(run_dir, "trainer.max_steps=1000", cache=cache)
    run.until(lambda: (run_dir / "checkpoints" / "step-2").is_dir(), "checkpoint step-2")
    run.signal(signal.SIGTERM)
    code, out = run.wait()
    assert code == 130, out[-4000:]
    assert any(line.startswith("interrupted:") and "resume with: " in line for line in out.splitlines()), out[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert not (run_dir / LOCK_FILE).exists()


def test_sigterm_handler_is_put_back_after_the_run():
    from polmctl.entry import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
    assert signal.getsignal(signal.SIGTERM) is before
