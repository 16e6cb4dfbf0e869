"""Several machines: the accelerate launch arguments of one machine, from the launcher keys or from a
Slurm job's environment (faked here), and the keys' checks.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_machines.py
"""

from __future__ import annotations

import subprocess

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from polmctl.compose import compose_validated
from polmctl.config.schema import LauncherConfig, RunConfig
from polmctl.errors import ConfigError
from polmctl.launch import launch_command
from polmctl.machines import machine_arguments, parse_nodelist, slurm_hosts

pytestmark = pytest.mark.unit


def slurm(node: int, nodelist: str = "gpu[07-08]", tasks: int = 2, **more: str) -> dict[str, str]:
    """The variables Slurm sets in task ``node`` of a job step with one task per node (PATH: no scontrol)."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_NTASKS": str(tasks),
        "PATH": "/nonexistent",
        **more,
    }


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("gpu[01-03,07],login2", ["gpu01", "gpu02", "gpu03", "gpu07", "login2"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("node9", ["node9"]),
        ("a,b", ["a", "b"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ],
)
def test_slurm_node_lists_are_read_as_scontrol_shows_them(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-", "gpu[a-b]", "", "x[1-2"])
def test_an_unreadable_node_list_is_refused(nodelist):
    with pytest.raises(ValueError):
        parse_nodelist(nodelist)


def test_one_machine_adds_nothing():
    assert machine_arguments(LauncherConfig(name="accelerate"), slurm(0)) == []


def test_under_slurm_the_rank_is_the_node_id_and_machine_0_the_first_host():
    launcher = LauncherConfig(name="accelerate", num_machines=2)
    for node in (0, 1):
        assert machine_arguments(launcher, slurm(node)) == [
            "--num_machines",
            "2",
            "--machine_rank",
            str(node),
            "--main_process_ip",
            "gpu07",
        ]
    # keys that are set win over the environment
    given = LauncherConfig(name="accelerate", num_machines=2, machine_rank=0, main_process_ip="10.1.2.3")
    assert machine_arguments(given, slurm(1))[3:] == ["0", "--main_process_ip", "10.1.2.3"]


def test_scontrol_is_asked_for_the_hosts_when_it_is_on_the_path(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/asked"\nprintf "alpha\\nbeta\\n"\n')
    scontrol.chmod(0o755)
    environ = slurm(1, nodelist="cluster-weird-syntax", PATH=str(tmp_path))
    assert slurm_hosts(environ) == ["alpha", "beta"]
    assert (tmp_path / "asked").read_text().split() == ["show", "hostnames", "cluster-weird-syntax"]
    assert machine_arguments(LauncherConfig(name="accelerate", num_machines=2), environ)[-1] == "alpha"


@pytest.mark.parametrize(
    "launcher,environ,key,needle",
    [
        (dict(num_machines=2), {}, "launcher.machine_rank", "no Slurm job"),
        (dict(num_machines=2, machine_rank=1), {}, "launcher.main_process_ip", "address of machine 0"),
        (dict(num_machines=2), slurm(0, "gpu[1-3]", tasks=3), "launcher.num_machines", "hydra.launcher.nodes=2"),
        (dict(num_machines=2), slurm(0, tasks=16), "launcher.num_machines", "hydra.launcher.tasks_per_node=1"),
        (dict(num_machines=2), slurm(0, nodelist="gpu[1-"), "launcher.main_process_ip", "cannot be read"),
    ],
)
def test_what_cannot_be_derived_names_the_key(launcher, environ, key, needle):
    with pytest.raises(ConfigError, match=key) as err:
        machine_arguments(LauncherConfig(name="accelerate", **launcher), {"PATH": "/nonexistent", **environ})
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["launcher.num_machines=2"], "launcher.name"),
        (["launcher=accelerate", "launcher.num_machines=0"], "launcher.num_machines"),
        (["launcher=accelerate", "launcher.num_machines=2", "launcher.machine_rank=2"], "launcher.machine_rank"),
        (["launcher=accelerate", "launcher.machine_rank=0"], "launcher.machine_rank"),
        (["launcher=accelerate", "launcher.main_process_ip=10.0.0.1"], "launcher.main_process_ip"),
        (["launcher=accelerate", "launcher.num_machines=2", "launcher.num_processes=3"], "launcher.num_processes"),
    ],
)
def test_machine_keys_are_checked_before_anything_runs(overrides, key):
    with pytest.raises(ConfigError, match=key):
        compose_validated(["recipe=sft", *overrides])


def test_the_launch_command_of_a_slurm_node_is_what_accelerate_expects(monkeypatch, tmp_path):
    for name, value in slurm(1).items():
        monkeypatch.setenv(name, value)
    launcher = LauncherConfig(name="accelerate", num_machines=2, num_processes=16, main_process_port=6000)
    run = RunConfig(launcher=launcher)
    command = launch_command(run, ["recipe=sft"], tmp_path)
    assert command[:3][1:] == ["-m", "accelerate.commands.launch"]
    flags = command[3 : command.index("-m", 3)]
    assert flags == [
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        run.trainer.mixed_precision,
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "gpu07",
        "--num_processes",
        "16",
        "--multi_gpu",
        "--main_process_port",
        "6000",
    ]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    assert (args.num_machines, args.machine_rank, args.main_process_ip, args.num_processes) == (2, 1, "gpu07", 16)
    # what accelerate hands torchrun on this machine: its 8 processes, node 1 of 2, machine 0's rendezvous
    from accelerate.utils.launch import prepare_multi_gpu_env

    prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint) == ("8", "2", 1, "gpu07:6000")


def test_several_machines_default_to_each_ones_gpus(monkeypatch, tmp_path):
    import polmctl.launch as launch

    for name, value in slurm(0).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(launch, "default_num_processes", lambda: 4)
    run = RunConfig(launcher=LauncherConfig(name="accelerate", num_machines=2))
    command = launch_command(run, [], tmp_path)
    assert command[command.index("--num_processes") + 1] == "8"


def test_scontrol_failing_falls_back_to_reading_the_list(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nexit 1\n")
    scontrol.chmod(0o755)
    assert slurm_hosts(slurm(0, PATH=str(tmp_path)), run=subprocess.run) == ["gpu07", "gpu08"]


def test_the_strategy_check_counts_the_processes_of_every_machine(monkeypatch):
    """Before the launch, N machines of one process each are N processes (DDP, no one-process-only
    option such as trainer.auto_batch), as launch_command starts them."""
    import polmctl.launch as launch

    monkeypatch.setattr(launch, "default_num_processes", lambda: 1)
    launcher = LauncherConfig(name="accelerate", num_machines=2, machine_rank=0, main_process_ip="127.0.0.1")
    assert launch.launch_strategy(RunConfig(launcher=launcher), None) == ("ddp", 2)
    run, _ = compose_validated(
        ["recipe=sft", "launcher=accelerate", "launcher.num_machines=2", "launcher.machine_rank=0",
         "launcher.main_process_ip=127.0.0.1", "trainer.auto_batch=true"]
    )  # fmt: skip
    with pytest.raises(ConfigError, match="trainer.auto_batch"):
        launch.check_launch(run, None)
