"""Build the accelerate ``Accelerator`` a run trains under (device, precision, processes, trackers)."""

from __future__ import annotations

import os
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list

from polmctl.config.schema import LoggerConfig, TrainerConfig
from polmctl.console import console


def make_accelerator(trainer: TrainerConfig, logger: LoggerConfig, run_dir: Path) -> Accelerator:
    """The run's Accelerator; with several processes its ``project_dir`` is rank 0's run dir."""
    import torch

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # accelerate runs several CPU processes (gloo) only when told cpu=True; "auto" means that without a GPU.
    cpu = trainer.device == "cpu" or (several and trainer.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)  # joins the process group when launched with several processes
    if state.num_processes > 1:
        run_dir = shared_run_dir(run_dir, state.is_main_process)
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=trainer.mixed_precision,
        log_with=list(logger.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers")),
    )
    console.quiet = not acc.is_main_process  # one copy of each line; entry.fail still prints a rank's error
    if trainer.device.startswith("cuda:") and acc.num_processes == 1:
        torch.cuda.set_device(int(trainer.device.split(":")[1]))
    return acc


def shared_run_dir(run_dir: Path, is_main: bool) -> Path:
    """Rank 0's run dir, on every rank. Under a bare ``accelerate launch`` without
    hydra.run.dir each rank's Hydra picks its own timestamped dir and they can straddle a
    second; the other ranks then drop the (empty) dir their Hydra made and use rank 0's."""
    agreed = Path(broadcast_object_list([str(run_dir.resolve())])[0])
    if not is_main and agreed != run_dir.resolve():
        try:
            run_dir.rmdir()
        except OSError:
            pass  # not empty or already gone: leave it
    return agreed


def run_device(trainer: TrainerConfig) -> str:
    """The device a one-process runner (evaluate, prune, merge, quantize) loads onto: trainer.device,
    or with ``auto`` the GPU when there is one."""
    import torch

    if trainer.device != "auto":
        return trainer.device
    return "cuda" if torch.cuda.is_available() else "cpu"
