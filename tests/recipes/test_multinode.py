"""Two "machines" on one host (two launches, one rendezvous, gloo on CPU) train like one process with the
same global batch: by hand (launcher.machine_rank / main_process_ip on each), as two torchrun nodes,
and as a Slurm job submitted by Hydra's submitit launcher (hydra/launcher=slurm), whose two node tasks
are started here with the variables Slurm would give them (sbatch, srun and sacct faked; everything
after them real).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/recipes/test_multinode.py
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from polmctl.engine.metrics import read_metrics
from tests.recipes.test_multiprocess import COMMON, STEPS, _free_port

pytestmark = pytest.mark.recipes
TWO_MACHINES = ["launcher=accelerate", "launcher.num_machines=2", "launcher.num_processes=2"]
# float32: the split into micro-batches then changes the sums only by float32 rounding (bf16's is ~1e-3)
FP32 = "model.dtype=float32"


def run_all(commands: list[list[str]], env: dict[str, str], cwd: Path, timeout: int = 400) -> list[str]:
    """Run the commands at once; each must exit 0. On a timeout every process tree is killed (a rank
    whose peer died waits in a collective, holding its pipes)."""
    env = {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        for c in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
        pytest.fail(f"the two machines took over {timeout} s (every process killed)")
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def kill_tree(pid_file: Path) -> None:
    if not pid_file.exists():
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        job = psutil.Process(int(pid_file.read_text()))
        for proc in [*job.children(recursive=True), job]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.fixture()
def one_process(train_recipe, tmp_path):
    """The reference: one process, 2 rows x 2 micro-batches a step (the two machines: 1 row each)."""
    return train_recipe(
        "sft", *STEPS, FP32, "trainer.micro_batch_size=2", "trainer.grad_accum=2", run_dir=tmp_path / "one"
    )


def assert_same_run(run_dir: Path, one) -> None:
    two = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]  # one writer, no line twice
    assert [m["loss"] for m in two] == pytest.approx(one.losses, rel=1e-4)
    assert [m["tokens"] for m in two] == [m["tokens"] for m in read_metrics(one.dir / "metrics.jsonl")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-6"]


def test_two_machines_by_hand_match_one_process(one_process, tmp_path):
    run_dir, port = tmp_path / "two", _free_port()
    base = [sys.executable, "-m", "polmctl", "run", *COMMON, FP32, *TWO_MACHINES, f"launcher.main_process_port={port}"]
    machine = [
        [*base, f"launcher.machine_rank={rank}", "launcher.main_process_ip=127.0.0.1", f"hydra.run.dir={run_dir}"]
        for rank in (0, 1)
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outputs = run_all(machine, env, tmp_path)
    assert_same_run(run_dir, one_process)
    for rank, output in enumerate(outputs):  # each started its own share of the processes
        assert f"--num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1 --num_processes 2" in output
    assert sum(o.count("sft run summary") for o in outputs) == 1  # rank 0 of machine 0 prints it


def test_two_torchrun_nodes_started_by_hand_match_one_process(one_process, tmp_path):
    """docs/distributed.md's torchrun-style launch: every process started by torchrun on each "node",
    polmctl running in each (no relaunch)."""
    run_dir, port = tmp_path / "two", _free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    node = [
        [*torchrun, "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "polmctl", "run", *COMMON, FP32, f"hydra.run.dir={run_dir}"]
        for rank in (0, 1)
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outputs = run_all(node, env, tmp_path)
    assert_same_run(run_dir, one_process)
    assert not any("launcher " in o for o in outputs)  # no accelerate relaunch


FAKE_SBATCH = """#!/bin/sh
# Job 42: the script's srun command runs as two node tasks of this host once sbatch has returned
# (submitit moves the job's pickle into place after that), with the variables Slurm gives tasks.
cp "$1" "$FAKE_SLURM/script.sh"
command=$(grep '^srun ' "$1" | sed 's/^srun .* --error [^ ]* //')
(
  sleep 2
  for node in 0 1; do
    SLURM_JOB_ID=42 SLURM_JOB_NODELIST=localhost,127.0.0.1 SLURM_STEP_NODELIST=localhost,127.0.0.1 \\
    SLURM_JOB_NUM_NODES=2 SLURM_NNODES=2 SLURM_NTASKS=2 SLURM_NODEID=$node SLURM_PROCID=$node \\
    SLURM_LOCALID=0 SUBMITIT_EXECUTOR=slurm sh -c "$command" > "$FAKE_SLURM/task$node.log" 2>&1 &
  done
  wait
  touch "$FAKE_SLURM/done"
) > /dev/null 2>&1 &
echo $! > "$FAKE_SLURM/job.pid"
echo "Submitted batch job 42"
"""
FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
if [ -e "$FAKE_SLURM/done" ]; then echo "42|COMPLETED|localhost"; else echo "42|RUNNING|localhost"; fi
"""


def test_a_two_node_slurm_job_matches_one_process(one_process, tmp_path):
    fake = tmp_path / "slurm"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", FAKE_SLURM=str(fake))
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "polmctl",
        "run",
        "-m",
        *COMMON,
        FP32,
        *TWO_MACHINES,
        f"launcher.main_process_port={_free_port()}",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep}",
    ]
    try:
        [output] = run_all([command], env, tmp_path)
    finally:  # the node tasks are no children of the test (sbatch has returned): end them by the job's pid
        kill_tree(fake / "job.pid")
    script = (fake / "script.sh").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1"):
        assert line in script
    tasks = [(fake / f"task{n}.log").read_text() for n in (0, 1)]
    for node, log in enumerate(tasks):  # each node launched its machine: rank from SLURM_NODEID, host 0 from the list
        expected = f"--num_machines 2 --machine_rank {node} --main_process_ip localhost --num_processes 2"
        assert expected in log, log[-3000:]
    assert_same_run(sweep / "0", one_process)
    assert json.loads((sweep / "sweep_summary.json").read_text())["jobs"][0]["status"] == "completed", output[-3000:]
