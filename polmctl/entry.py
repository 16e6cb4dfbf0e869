"""The one ``@hydra.main``: compose, validate, look the method's runner up, call it.

``polmctl run ARGS`` hands ARGS to Hydra unchanged, so everything Hydra accepts works:
overrides, ``-m`` sweeps, ``--cfg job``, ``hydra/launcher=...``, sweepers.

The runner runs holding its run dir (``runners.common.held_run_dir``: a second run into it stops at
once). Ctrl-C, or SIGTERM (what Slurm and most schedulers send before a kill), exits 130 with a line
naming the last checkpoint and the command that resumes; a user error exits 1 with its one line;
either way summary.json says how the run ended.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shlex
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import hydra
from omegaconf import DictConfig
from rich.markup import escape

from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.errors import USER_ERRORS, ConfigError
from polmctl.methods.registry import register_configs
from polmctl.validate import check_overrides, runner_of, validate

register_configs()


def fail(kind: str, message: str, code: int = 2) -> None:
    console.quiet = False  # ranks > 0 of a multi-process run are quiet, but not about their own errors
    # Escaped: messages are plain text, and brackets in them (eval.tasks=[a,b], paths) are not rich markup.
    console.print(f"[bold red]{kind}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise SystemExit(code)


def run_config(cfg: DictConfig) -> Any:
    """Validate ``cfg`` and run it; returns the runner's objective value for sweepers."""
    from polmctl.sweeps import check_sweep_metric, sweep_objective

    try:
        run = validate(cfg)
        check_sweep_metric(run)
    except ConfigError as err:
        fail("config error", str(err))
    from polmctl.launch import run_with_launcher

    try:
        with sigterm_as_interrupt():
            summary = run_with_launcher(run, run_holding_its_dir)  # launcher=accelerate: N processes
    except KeyboardInterrupt:
        interrupted(run)
    except USER_ERRORS as err:
        fail(type(err).__name__, str(err).strip() or repr(err), code=1)
    try:
        return sweep_objective(run, summary)  # sweep.metric, for sweepers that optimise it
    except ConfigError as err:
        fail("config error", str(err))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so a scheduler's stop (Slurm's time limit,
    ``kill``) ends a run as Ctrl-C does: summary.json "interrupted", the resume line. Outside the
    main thread (where signals cannot be set) the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_holding_its_dir(run: RunConfig) -> dict[str, Any]:
    """The run's runner, holding its run dir from before anything loads (of several processes, rank 0 holds it)."""
    from polmctl.runners.common import held_run_dir

    command = "polmctl run " + shlex.join(sys.argv[1:])
    with held_run_dir(Path(run.output_dir), command, lock=int(os.environ.get("RANK", "0")) == 0):
        from polmctl.runners import RUNNERS

        return RUNNERS[runner_of(run)](run)


def interrupted(run: RunConfig) -> NoReturn:
    """Ctrl-C: one line with the last checkpoint and the command that goes on from it; exit 130."""
    from polmctl.engine.checkpoint import newest_checkpoint
    from polmctl.launch import launched_world_size

    run_dir = Path(run.output_dir)
    last = newest_checkpoint(run_dir)
    where = f"last checkpoint {last}" if last else "no checkpoint was written (trainer.save_every=0)"
    if runner_of(run) not in ("train", "pipeline"):
        then = "this runner does not resume: run the command again"
    elif launched_world_size() is not None:  # a rank of accelerate launch: the launch command is not ours
        then = f"resume: add resume=auto hydra.run.dir={shlex.quote(str(run_dir))} to the launch command"
    else:
        then = f"resume with: {resume_command(run_dir)}"
    console.quiet = False
    console.print(f"[bold yellow]interrupted:[/] {escape(f'{where}; {then}')}", highlight=False, soft_wrap=True)
    raise SystemExit(130)


def resume_command(run_dir: Path) -> str:
    """This job's command with resume=auto, pointed at its run dir."""
    from hydra.core.hydra_config import HydraConfig

    given = HydraConfig.get().overrides if HydraConfig.initialized() else None
    task, hydra_args = (list(given.task), list(given.hydra)) if given else (sys.argv[1:], [])
    own = ("resume", "hydra.run.dir", "hydra.sweep", "hydra.mode", "hydra.job.num", "hydra.job.id", "hydra.runtime")
    args = [o for o in task + hydra_args if not o.split("=", 1)[0].lstrip("+~").startswith(own)] + ["resume=auto"]
    if not any(o.split("=", 1)[0] == "output_dir" for o in args):
        args.append(f"hydra.run.dir={run_dir}")
    return "polmctl run " + shlex.join(args)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig) -> Any:
    return run_config(cfg)


def quiet_libraries() -> None:
    """Library chatter that says nothing to a polmctl user stays out of the terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (cpu_int8) logs missing CUDA/triton kernels on CPU-only installs, on import.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # peft calls a transformers method that transformers 5 deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(args: Sequence[str] | None = None) -> None:
    """Run Hydra on ``args`` (default: the process's own arguments)."""
    quiet_libraries()
    if args is not None:
        sys.argv = [sys.argv[0] if sys.argv else "polmctl", *args]
    from polmctl.sweeps import missing_plugin

    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        fail("config error", str(err))
    missing = missing_plugin(sys.argv[1:])
    if missing:
        fail("missing plugin", missing)
    from polmctl.launch import launched_world_size, rank_arguments

    sys.argv = [sys.argv[0], *rank_arguments(sys.argv[1:])]  # ranks > 0 leave .hydra/ and the log to rank 0
    several = (launched_world_size() or 1) > 1
    if several:  # `kill -USR1 <pid>` prints where every thread of a stuck rank is, to its stderr
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    hydra_main()
    if several:
        leave_rank()


def leave_rank() -> NoReturn:
    """A rank of a multi-process run that finished cleanly exits without the interpreter's teardown,
    which would free the distributed objects the runner kept (engine.device.keep_until_exit says why
    that can deadlock). Errors do not come here: they leave through SystemExit with their exit code."""
    logging.shutdown()  # flushes and closes the log file handlers
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
