"""Two processes (DDP over gloo, CPU) train like one with the same global batch.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/recipes/test_multiprocess.py

The two-process runs go through the real path, ``polmctl run launcher=accelerate
launcher.num_processes=2 ...``, which re-runs the command under ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from polmctl.config.schema import LauncherConfig, RunConfig
from polmctl.engine.metrics import read_metrics
from polmctl.errors import ConfigError
from polmctl.launch import ACCELERATE_CONFIGS, accelerate_config_path, rank_arguments, run_with_launcher
from polmctl.methods.prune import PruneMethod

pytestmark = pytest.mark.recipes

# float32: the comparisons below are exact up to float rounding, which bf16 (model.dtype=auto on a CPU with
# bf16 matmuls) would swamp.
STEPS = ["model.dtype=float32", "trainer.max_steps=6", "trainer.save_every=2", "data.max_rows=40", "trainer.lr=1e-2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON = [
    "recipe=sft",
    "model=tiny",
    "eval=none",
    "eval.tasks=[]",
    "logger.progress=false",
    "trainer.warmup_ratio=0",
    *STEPS,
    "trainer.micro_batch_size=1",
    "trainer.grad_accum=2",
]


def run_two_processes(
    command: list[str], cwd: Path | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a launcher and its ranks; on a timeout kill the whole process tree. torch's elastic agent
    starts each rank in a session of its own, so killing the launcher's group would leave a rank
    waiting on a collective after its peer died, holding the output pipes open. ``check``: the
    command must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        children = psutil.Process(proc.pid).children(recursive=True)
        for child in children:  # each polmctl rank prints its threads' stacks on SIGUSR1 (polmctl/entry.py)
            with contextlib.suppress(psutil.NoSuchProcess):
                if "polmctl" in " ".join(child.cmdline()) and "RANK" in child.environ():
                    child.send_signal(signal.SIGUSR1)
        time.sleep(3)
        for child in [*children, proc]:  # ranks first, then the launcher
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(
            f"the two-process run took over {timeout} s (every rank killed; stacks of the ranks still alive "
            f"at the end):\n" + stdout[-3000:] + stderr[-12000:]
        )
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_processes_match_one_with_the_same_global_batch_and_resume(train_recipe, tmp_path):
    # One process: 2 rows x 2 micro-batches per step. Two: 1 row x 2 micro-batches on each rank.
    one = train_recipe("sft", *STEPS, "trainer.micro_batch_size=2", "trainer.grad_accum=2", run_dir=tmp_path / "one")
    run_dir = tmp_path / "two"
    done = run_two_processes(
        [
            sys.executable,
            "-m",
            "polmctl",
            "run",
            *COMMON,
            "launcher=accelerate",
            "launcher.num_processes=2",
            f"launcher.main_process_port={_free_port()}",
            f"hydra.run.dir={run_dir}",
        ]
    )

    two = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]  # one writer: no line twice
    assert [m["loss"] for m in two] == pytest.approx(one.losses, rel=1e-4)
    assert [m["tokens"] for m in two] == [m["tokens"] for m in read_metrics(one.dir / "metrics.jsonl")]
    # Rank 0 wrote every file; rank 1 wrote none (no second .hydra, log or temp dir) and printed nothing.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        "checkpoints",
        "final",
        "metrics.jsonl",
        "polmctl.log",
        "summary.json",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert (done.stdout + done.stderr).count("sft run summary") == 1
    assert "launcher=none" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    # The run records what ran: DDP over gloo, and says so in its log.
    distributed = json.loads((run_dir / "summary.json").read_text())["distributed"]
    assert (distributed["strategy"], distributed["processes"], distributed["backend"]) == ("ddp", 2, "gloo")
    assert "distributed: ddp, 2 process(es), backend gloo on cpu" in (run_dir / "polmctl.log").read_text()

    # Resume from step 4 as `accelerate launch -m polmctl` started by hand, without hydra.run.dir:
    # both ranks end up in rank 0's new timestamped run dir, and steps 5 and 6 come out the same.
    shutil.rmtree(run_dir / "checkpoints" / "step-6")
    run_two_processes(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "polmctl",
            "run",
            *COMMON,
            f"resume={run_dir}",
        ],
        cwd=tmp_path,
    )
    [resumed_dir] = [p for p in (tmp_path / "outputs").glob("sft/*/*")]
    assert json.loads((resumed_dir / "summary.json").read_text())["resumed_from"].endswith("step-4")
    resumed = read_metrics(resumed_dir / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [5, 6]
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in two[4:]], rel=1e-6)


def test_ranks_after_the_first_leave_hydra_files_to_rank_0(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert rank_arguments(["recipe=sft"]) == ["recipe=sft", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    assert rank_arguments(["hydra/job_logging=stdout"])[-1] == "hydra.output_subdir=null"
    monkeypatch.setenv("RANK", "0")
    assert rank_arguments(["recipe=sft"]) == ["recipe=sft"]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs_are_valid(name):
    path = accelerate_config_path(name)
    config = load_config_from_file(str(path))
    assert config.num_machines == 1 and config.compute_environment.value == "LOCAL_MACHINE"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "polmctl", "run"])
    args, _, _ = _validate_launch_command(args)  # what `accelerate launch --config_file` checks
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert config.distributed_type.value == expected[name]
    assert (args.use_fsdp, args.use_deepspeed) == (name == "fsdp", name.startswith("deepspeed"))
    if name == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        monkeypatch = pytest.MonkeyPatch()
        for key, value in prepare_multi_gpu_env(args).items():
            monkeypatch.setenv(key, value)
        try:
            plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher sets
            assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
        finally:
            monkeypatch.undo()
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_unknown_accelerate_config_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="launcher.config_file.*ddp, deepspeed_zero2, deepspeed_zero3, fsdp"):
        accelerate_config_path("zero9")
    assert sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")) == [
        "ddp",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "fsdp",
    ]


def test_only_the_train_runner_runs_in_several_processes(monkeypatch):
    run = RunConfig(method=PruneMethod(), launcher=LauncherConfig(name="accelerate", num_processes=2))
    with pytest.raises(ConfigError, match="the prune runner \\(method=prune\\) runs in one process"):
        run_with_launcher(run, lambda _: {})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by hand with accelerate launch / torchrun
    with pytest.raises(ConfigError, match="launcher"):
        run_with_launcher(RunConfig(method=PruneMethod()), lambda _: {})
    # Inside a launched process launcher=accelerate never launches again: the runner runs here.
    assert run_with_launcher(RunConfig(launcher=LauncherConfig(name="accelerate")), lambda _: {"ran": True}) == {
        "ran": True
    }
