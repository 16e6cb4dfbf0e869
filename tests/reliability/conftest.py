"""Runs of ``python -m polmctl run`` as separate processes, to stop, kill and start again.

Every wait is bounded; on a timeout the whole process tree is killed and the test fails with the
output so far."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from polmctl.engine.metrics import read_metrics

# A tiny SFT run: 8 steps, a checkpoint every 2 (the last two kept), a metrics line every step. A constant
# learning rate, so a run given more steps (to be sure it is still running when stopped) follows the same curve.
ARGS = [
    "recipe=sft",
    "model=tiny",
    "eval=none",
    "eval.tasks=[]",
    "logger.progress=false",
    "trainer.warmup_ratio=0",
    "data.max_rows=32",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=8",
    "trainer.save_every=2",
    "trainer.lr=1e-2",
    "trainer.scheduler=constant",
]
TIMEOUT = 240


def _sigint_default() -> None:
    """In the child before exec: Ctrl-C as a terminal delivers it. A test session started in the background of a
    script (``cmd &`` without job control) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored,
    so the run would never see the test's SIGINT (how the Ctrl-C test failed in two clean-clone runs)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """One ``polmctl run`` process (or a Python script that ends in polmctl.entry.main)."""

    def __init__(self, run_dir: Path, *overrides: str, cache: Path, script: str | None = None):
        self.dir = run_dir
        args = [*ARGS, *overrides, f"hydra.run.dir={run_dir}"]
        command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "polmctl", "run", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400", "POLMCTL_CACHE": str(cache)}
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, preexec_fn=_sigint_default
        )
        self.pid = self.proc.pid

    def wait(self, timeout: float = TIMEOUT) -> tuple[int, str]:
        """(exit code, output); the process tree is killed if it runs past ``timeout``."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            out, _ = self.proc.communicate(timeout=60)
            pytest.fail(f"polmctl run took over {timeout} s (killed):\n{out[-4000:]}")
        return self.proc.returncode, out

    def until(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Poll ``condition`` every 5 ms while the process runs."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                out = self.proc.stdout.read()
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{out[-4000:]}")
            if time.monotonic() > deadline:
                self.kill_tree()
                pytest.fail(f"no {what} within {timeout} s (killed)")
            time.sleep(0.005)

    def logged(self) -> list[dict]:
        """metrics.jsonl so far (a line being written is skipped)."""
        path = self.dir / "metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        return rows

    def logged_steps(self) -> list[int]:
        return [row["step"] for row in self.logged()]

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill_tree(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in [*psutil.Process(self.pid).children(recursive=True), psutil.Process(self.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(signal.SIGCONT)  # a stopped process dies only once it runs
                    child.kill()


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "polmctl-cache"


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache) -> Callable[[], list[float]]:
    """The uninterrupted run's loss curve; started at once, waited for when asked."""
    run = Run(tmp_path_factory.mktemp("reference") / "run", cache=cache)
    curve: list[float] = []

    def result() -> list[float]:
        if not curve:
            code, out = run.wait()
            assert code == 0, out[-4000:]
            curve.extend(losses(run.dir))
            assert len(curve) == 8
        return curve

    yield result
    if run.proc.poll() is None:
        run.kill_tree()
        run.proc.communicate(timeout=60)
