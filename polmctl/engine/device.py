"""Build the accelerate ``Accelerator`` a run trains under (device, precision, processes, trackers).

The distribution strategy the launcher asked for (engine/sharding.py) decides how accelerate's
process state is made: DDP and FSDP2 on CPU run as accelerate's MULTI_CPU (gloo; the engine
applies FSDP2 itself), DeepSpeed on CPU needs its process group made with gloo first and
DS_ACCELERATOR=cpu, since accelerate would otherwise see one process per rank."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list

from polmctl.config.schema import LoggerConfig, TrainerConfig
from polmctl.console import console
from polmctl.engine.sharding import Strategy, requested_strategy
from polmctl.errors import TrainingError


def make_accelerator(trainer: TrainerConfig, logger: LoggerConfig, run_dir: Path) -> Accelerator:
    """The run's Accelerator; with several processes its ``project_dir`` is rank 0's run dir."""
    import torch

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    requested = requested_strategy()
    on_cpu = trainer.device == "cpu" or (trainer.device == "auto" and not torch.cuda.is_available())
    if requested in ("fsdp2", "deepspeed_zero3") and not several:
        raise TrainingError(
            f"launcher.num_processes: {requested} with one process shards nothing; start 2 or more, or drop "
            "launcher.config_file"
        )
    if requested.startswith("deepspeed"):
        check_deepspeed(on_cpu)
        # accelerate takes DeepSpeed only when not told cpu=True, and on CPU it then finds no backend and
        # sees one process per rank: a gloo process group made first gives it the real world size.
        state = PartialState(backend="gloo") if on_cpu else PartialState()
        cpu = False
    else:
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


def check_deepspeed(on_cpu: bool) -> None:
    """DeepSpeed installed (the ``deepspeed`` extra), told to run on the CPU when there is no GPU."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise TrainingError(
            "launcher.config_file: a DeepSpeed config was given but deepspeed is not installed; "
            "pip install 'polmctl[deepspeed]' (or use launcher.config_file=fsdp)"
        )
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported


@contextlib.contextmanager
def whole_model(acc: Accelerator) -> Iterator[None]:
    """Under ZeRO-3, code in here works on a whole (unpartitioned) model. transformers reads
    accelerate's registered stage-3 config: while loading, to partition the model as it loads
    (deepspeed.zero.Init, whatever zero3_init_flag says), and in generate(), to keep every rank
    stepping (synced_gpus), which would hang rank 0's evaluation while the others wait. polmctl
    loads the whole model on each rank (references, evaluation before training and adapters need
    it; a teacher or reward model a method loads stays whole), ZeRO-3 partitions the policy when
    the trainer prepares it, and rank 0 evaluates the whole
    gathered copy. The config is registered again afterwards, for the rollouts' generate()."""
    plugin = acc.state.deepspeed_plugin if acc.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def run_strategy(acc: Accelerator) -> Strategy:
    """The strategy this run was asked for, with its processes, backend and device."""
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    return Strategy(requested_strategy(), acc.num_processes, backend, acc.device.type)


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


# A rank's distributed objects, kept from being freed until the rank exits (keep_until_exit).
_KEPT_UNTIL_EXIT: list[object] = []


def keep_until_exit(*objects: object) -> None:
    """Keep ``objects`` (the DDP-wrapped model, the trainer, the accelerator) alive until this rank
    exits through ``entry.leave_rank``, whose ``os._exit`` skips their destructors.

    Why: freeing the DDP model frees its Reducer and, with it, the gloo process group, whose C++
    destructor joins gloo's work thread while holding the GIL; now and then that thread is still
    freeing the last barrier's work, which drops a Python tensor and waits for the GIL: a deadlock
    (seen with gdb in one rank of a finished run: ``~ProcessGroupGloo`` in ``thread.join`` and
    ``AsyncBarrierWork::~AsyncBarrierWork`` in ``take_gil``). The run was complete; the launch never returned."""
    _KEPT_UNTIL_EXIT.extend(objects)
