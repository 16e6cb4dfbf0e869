"""The one ``@hydra.main``: compose, validate, look the method's runner up, call it.

``polmctl run ARGS`` hands ARGS to Hydra unchanged, so everything Hydra accepts works:
overrides, ``-m`` sweeps, ``--cfg job``, ``hydra/launcher=...``, sweepers.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, Sequence

import hydra
from omegaconf import DictConfig

from polmctl.console import console
from polmctl.errors import USER_ERRORS, ConfigError
from polmctl.methods.registry import register_configs
from polmctl.validate import check_overrides, runner_of, validate

register_configs()


def fail(kind: str, message: str, code: int = 2) -> None:
    console.quiet = False  # ranks > 0 of a multi-process run are quiet, but not about their own errors
    console.print(f"[bold red]{kind}:[/] {message}", highlight=False, soft_wrap=True)
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
    from polmctl.runners import RUNNERS

    try:
        summary = run_with_launcher(run, RUNNERS[runner_of(run)])  # launcher=accelerate: N processes
    except USER_ERRORS as err:
        fail(type(err).__name__, str(err).strip() or repr(err), code=1)
    try:
        return sweep_objective(run, summary)  # sweep.metric, for sweepers that optimise it
    except ConfigError as err:
        fail("config error", str(err))


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
        from rich.markup import escape

        fail("missing plugin", escape(missing))
    from polmctl.launch import rank_arguments

    sys.argv = [sys.argv[0], *rank_arguments(sys.argv[1:])]  # ranks > 0 leave .hydra/ and the log to rank 0
    hydra_main()


if __name__ == "__main__":
    main()
