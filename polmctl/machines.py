"""Several machines: the ``accelerate launch`` arguments that put this machine into one process
group with the others (``launcher.num_machines`` > 1), from the launcher keys or, under Slurm,
from the job's environment.

    polmctl run -m recipe=sft launcher=accelerate launcher.num_machines=2 hydra/launcher=slurm
    polmctl run recipe=sft launcher=accelerate launcher.num_machines=2 launcher.machine_rank=1 \\
        launcher.main_process_ip=10.0.0.1 hydra.run.dir=/shared/runs/sft      # by hand, on each machine

Each machine runs one ``polmctl run`` (under Slurm: one task per node), which starts that
machine's share of ``launcher.num_processes`` with ``accelerate launch --num_machines N
--machine_rank R --main_process_ip IP``; rank 0 of machine 0 hosts the rendezvous. Under Slurm
R is ``$SLURM_NODEID`` and IP is the first host of the step's node list (``scontrol show
hostnames``, or the list read here when scontrol is not on the PATH), and the step must run one
task on each of ``num_machines`` nodes. Keys that are set win over the environment.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Callable, Mapping

from polmctl.config.schema import LauncherConfig
from polmctl.errors import ConfigError


def machine_arguments(
    launcher: LauncherConfig,
    environ: Mapping[str, str] = os.environ,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> list[str]:
    """``--num_machines N --machine_rank R --main_process_ip IP`` for ``num_machines`` > 1, else []."""
    machines = launcher.num_machines
    if machines == 1:
        return []
    slurm = "SLURM_JOB_ID" in environ
    if slurm:
        hosts = slurm_hosts(environ, run)
        _check_allocation(machines, hosts, environ)
    rank, ip = launcher.machine_rank, launcher.main_process_ip
    if rank is None:
        if "SLURM_NODEID" not in environ:
            raise ConfigError(
                "launcher.machine_rank",
                f"is not set, and this is no Slurm job to read it from ($SLURM_NODEID): on each of the "
                f"{machines} machines give its rank, 0 .. {machines - 1}",
            )
        rank = int(environ["SLURM_NODEID"])
    if ip is None:
        if not slurm:
            raise ConfigError(
                "launcher.main_process_ip",
                "is not set, and this is no Slurm job to read it from: give the address of machine 0 "
                "(the same on every machine)",
            )
        ip = hosts[0]
    return ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", ip]


def _check_allocation(machines: int, hosts: list[str], environ: Mapping[str, str]) -> None:
    if len(hosts) != machines:
        raise ConfigError(
            "launcher.num_machines",
            f"is {machines}, and this Slurm job runs on {len(hosts)} node(s) ({','.join(hosts[:4])}); ask "
            f"Slurm for {machines} (hydra.launcher.nodes={machines}) or set launcher.num_machines={len(hosts)}",
        )
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if tasks is not None and int(tasks) != machines:
        raise ConfigError(
            "launcher.num_machines",
            f"is {machines}, and this Slurm job runs {tasks} tasks: polmctl starts each machine's processes "
            "itself, so it needs one task per node (hydra.launcher.tasks_per_node=1)",
        )


def slurm_hosts(environ: Mapping[str, str], run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
    """The hosts of this Slurm job step, in node order: what ``scontrol show hostnames`` says, or
    the node list read here where scontrol is not on the PATH."""
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError(
            "launcher.main_process_ip", "is not set and $SLURM_JOB_NODELIST is missing: give machine 0's address"
        )
    scontrol = shutil.which("scontrol", path=environ.get("PATH"))
    if scontrol:
        done = run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        hosts = done.stdout.split()
        if done.returncode == 0 and hosts:
            return hosts
    try:
        return parse_nodelist(nodelist)
    except ValueError:
        raise ConfigError(
            "launcher.main_process_ip", f"is not set and the Slurm node list {nodelist!r} cannot be read; set it"
        ) from None


def parse_nodelist(nodelist: str) -> list[str]:
    """A Slurm node list as hosts: ``gpu[01-03,07],login2`` -> gpu01, gpu02, gpu03, gpu07, login2
    (brackets anywhere in a name, several per name, zero padding kept). Written here because
    submitit's parser is private and submitit optional; scontrol, when present, is asked first."""
    if nodelist.count("[") != nodelist.count("]") or not nodelist.strip():
        raise ValueError(nodelist)
    hosts: list[str] = []
    for group in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist):
        names = [""]
        for part in re.findall(r"\[[^\]]*\]|[^\[]+", group):
            names = [n + s for n in names for s in (_ranges(part[1:-1]) if part.startswith("[") else [part])]
        hosts += names
    return hosts


def _ranges(spec: str) -> list[str]:
    """``001-003,7`` -> 001, 002, 003, 7."""
    out = []
    for item in spec.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(spec)
        out += [f"{n:0{len(low)}d}" for n in range(int(low), int(high or low) + 1)]
    return out
