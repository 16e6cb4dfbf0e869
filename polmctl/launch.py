"""Several processes: re-run a command under ``accelerate launch`` (launcher=accelerate).

    polmctl run recipe=sft launcher=accelerate launcher.num_processes=2
    polmctl run recipe=sft launcher=accelerate launcher.config_file=fsdp
    polmctl run -m recipe=sft launcher=accelerate launcher.num_machines=2 hydra/launcher=slurm
    accelerate launch --num_processes 2 -m polmctl run recipe=sft hydra.run.dir=outputs/sft/ddp

The first form composes the run once (which fixes its run dir), then starts
``accelerate launch -m polmctl run <the same overrides> launcher=none hydra.run.dir=<that dir>``
and waits for it, so every rank writes into one run dir. Ranks after the first leave Hydra's
``.hydra/`` and log file to rank 0 (see ``rank_arguments``). Only the train runner runs in
several processes; see docs/distributed.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from polmctl.config.schema import RunConfig
from polmctl.errors import ConfigError
from polmctl.machines import machine_arguments
from polmctl.validate import runner_of

ACCELERATE_CONFIGS = Path(__file__).parent / "conf" / "accelerate"
MULTI_PROCESS_RUNNERS = ("train",)


def launched_world_size() -> int | None:
    """The process count when this process was started by accelerate / torchrun, else None."""
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_arguments(args: Sequence[str]) -> list[str]:
    """Hydra arguments for this rank: ranks after the first write no ``.hydra/`` and no log file
    into the shared run dir (rank 0 does), so only rank 0 writes files."""
    args = list(args)
    if int(os.environ.get("RANK", "0")) == 0:
        return args
    given = {_key(a) for a in args}
    return args + [a for a in ("hydra.output_subdir=null", "hydra/job_logging=disabled") if _key(a) not in given]


def run_with_launcher(run: RunConfig, runner: Callable[[RunConfig], dict[str, Any]]) -> dict[str, Any]:
    """Run ``runner`` here, or with launcher=accelerate re-run the command under accelerate."""
    world = launched_world_size()
    wants_several = run.launcher.name == "accelerate" or (world or 1) > 1
    if wants_several and runner_of(run) not in MULTI_PROCESS_RUNNERS:
        raise ConfigError(
            "launcher",
            f"the {runner_of(run)} runner (method={run.method.name}) runs in one process; only "
            f"{', '.join(MULTI_PROCESS_RUNNERS)} runs in several: drop launcher=accelerate "
            "(or run it without accelerate launch / torchrun)",
        )
    if wants_several:
        check_launch(run, world)  # the strategy against the rest of the run, before any process starts
    if run.launcher.name != "accelerate" or world is not None:
        return runner(run)
    return relaunch(run)


def launch_strategy(run: RunConfig, world: int | None) -> tuple[str, int]:
    """(strategy, processes) of this launch: in a rank, what the launcher's variables say; before a
    launch, what launcher.config_file asks for (engine/sharding.py, launch_strategy.py)."""
    from polmctl.launch_strategy import config_file_strategy

    if world is not None:
        from polmctl.engine.sharding import requested_strategy

        return requested_strategy(), world
    path = accelerate_config_path(run.launcher.config_file) if run.launcher.config_file else None
    strategy = config_file_strategy(path) if path else "ddp"
    if not (processes := run.launcher.num_processes):  # else as launch_command counts them
        processes = _config_processes(path) if path else default_num_processes() * run.launcher.num_machines
    return ("single" if strategy == "ddp" and processes == 1 else strategy), processes


def _config_processes(path: Path) -> int:
    from accelerate.commands.config.config_args import load_config_from_file

    return int(load_config_from_file(str(path)).num_processes or 1)


def check_launch(run: RunConfig, world: int | None) -> None:
    from polmctl.launch_strategy import check_strategy

    strategy, processes = launch_strategy(run, world)
    check_strategy(run, strategy, processes)


def relaunch(run: RunConfig) -> dict[str, Any]:
    """``accelerate launch -m polmctl run ...`` for this job; its summary.json (empty if none)."""
    run_dir = Path(run.output_dir).resolve()
    command = launch_command(run, job_overrides(), run_dir)
    from polmctl.console import console

    console.print(f"[bold]launcher[/] {' '.join(command[3:])}", highlight=False, soft_wrap=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if on_cpu(run) and launch_strategy(run, None)[0].startswith("deepspeed"):
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo), read at its import
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        raise SystemExit(code)  # the ranks have printed their own errors
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def job_overrides() -> list[str]:
    """This job's own overrides (a sweep job's, not the sweep's), minus those the launch replaces."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides
    task = [o for o in overrides.task if not _key(o).startswith("launcher")]
    replaced = (
        "hydra.run.dir",
        "hydra.sweep",
        "hydra.mode",
        "hydra/launcher",
        "hydra/sweeper",
        "hydra.launcher",
        "hydra.sweeper",
        "hydra.job.num",
        "hydra.job.id",
    )
    return task + [o for o in overrides.hydra if not _key(o).startswith(replaced)]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def launch_command(run: RunConfig, overrides: Sequence[str], run_dir: Path) -> list[str]:
    launcher = run.launcher
    args = [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher.config_file:
        args += ["--config_file", str(accelerate_config_path(launcher.config_file))]
    else:  # the values accelerate would otherwise warn that it defaulted
        args += ["--num_machines", "1"] if launcher.num_machines == 1 else []
        args += ["--dynamo_backend", "no", "--mixed_precision", run.trainer.mixed_precision]
    args += machine_arguments(launcher)  # several machines: their count, this one's rank, machine 0's address
    per_machine = None if launcher.config_file else default_num_processes()
    num_processes = launcher.num_processes or (per_machine and per_machine * launcher.num_machines)
    if num_processes:
        args += ["--num_processes", str(num_processes)]
    if num_processes and num_processes > 1 and not launcher.config_file:
        # torchrun-style workers, on CPU too: accelerate's --cpu starts one process (or needs mpirun);
        # each worker then picks gloo on CPU (engine/device.py).
        args.append("--multi_gpu")
    elif on_cpu(run) and num_processes == 1:
        args.append("--cpu")
    if launcher.main_process_port:
        args += ["--main_process_port", str(launcher.main_process_port)]
    return args + ["-m", "polmctl", "run", *overrides, "launcher=none", f"hydra.run.dir={run_dir}"]


def on_cpu(run: RunConfig) -> bool:
    import torch

    return run.trainer.device == "cpu" or (run.trainer.device == "auto" and not torch.cuda.is_available())


def default_num_processes() -> int:
    import torch

    return torch.cuda.device_count() or 1


def accelerate_config_path(name_or_path: str) -> Path:
    """``fsdp`` -> polmctl/conf/accelerate/fsdp.yaml; a path stays a path."""
    path = Path(name_or_path)
    shipped = ACCELERATE_CONFIGS / f"{name_or_path}.yaml"
    if not path.exists() and shipped.exists():
        path = shipped
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
        raise ConfigError(
            "launcher.config_file",
            f"{name_or_path!r} is not a file; give a path to an accelerate config YAML or one of: {names}",
        )
    return path
