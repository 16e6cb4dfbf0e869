"""Build the accelerate ``Accelerator`` a run trains under (device, precision, trackers)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from polmctl.config.schema import LoggerConfig, TrainerConfig


def make_accelerator(trainer: TrainerConfig, logger: LoggerConfig, run_dir: Path) -> Accelerator:
    cpu = trainer.device == "cpu"
    acc = Accelerator(
        cpu=cpu,
        mixed_precision=trainer.mixed_precision,
        log_with=list(logger.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers")),
    )
    if trainer.device.startswith("cuda:") and acc.num_processes == 1:
        import torch

        torch.cuda.set_device(int(trainer.device.split(":")[1]))
    return acc
