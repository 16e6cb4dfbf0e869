"""The strategy a launch asks for, and what cannot run under it: one-line config errors naming the
key, before any process starts (polmctl/launch_strategy.py), and the ranks' own check that what
was prepared is what was asked for (engine/sharding.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_launch_strategy.py
"""

from __future__ import annotations

import pytest
import torch

from polmctl.compose import compose_config
from polmctl.engine.sharding import Strategy, requested_strategy
from polmctl.errors import ConfigError, TrainingError
from polmctl.launch import accelerate_config_path, check_launch, run_with_launcher
from polmctl.launch_strategy import config_file_strategy
from polmctl.methods.registry import METHODS
from polmctl.validate import validate

pytestmark = pytest.mark.unit


def run_config(*overrides: str, config: str = "fsdp", processes: int = 2):
    launcher = ["launcher=accelerate", f"launcher.num_processes={processes}", f"launcher.config_file={config}"]
    return validate(compose_config(["model=tiny", *overrides, *launcher]))


def refused(*overrides: str, **launch) -> ConfigError:
    """The error ``polmctl run`` stops with before it launches anything."""
    with pytest.raises(ConfigError) as err:
        run_with_launcher(run_config(*overrides, **launch), lambda _: pytest.fail("the runner ran"))
    return err.value


@pytest.mark.parametrize(
    "name, strategy",
    [("ddp", "ddp"), ("fsdp", "fsdp2"), ("deepspeed_zero2", "deepspeed_zero2"), ("deepspeed_zero3", "deepspeed_zero3")],
)
def test_each_shipped_config_file_names_its_strategy(name, strategy):
    assert config_file_strategy(accelerate_config_path(name)) == strategy


def test_fsdp1_is_refused_naming_the_config_file(tmp_path):
    path = tmp_path / "fsdp1.yaml"
    path.write_text(accelerate_config_path("fsdp").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    with pytest.raises(ConfigError, match="launcher.config_file: .* asks for FSDP1; polmctl runs FSDP2"):
        config_file_strategy(path)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["recipe=qlora"], "model.quantization"),  # bitsandbytes 4-bit weights are not sharded
        (["recipe=sft", "trainer.auto_batch=true"], "trainer.auto_batch"),
        (["recipe=lora", "peft.method=adalora"], "peft.method"),
        (["recipe=prompt_tuning"], "peft.method"),
        (["recipe=sft", "trainer.optimizer=adamw_8bit"], "trainer.optimizer"),
    ],
)
def test_what_fsdp_does_not_combine_with_is_a_config_error(overrides, key):
    err = refused(*overrides)
    assert err.key == key and "\n" not in str(err)


def test_a_sharded_strategy_with_one_process_is_refused():
    assert refused("recipe=sft", processes=1).key == "launcher.num_processes"


def test_auto_batch_is_refused_under_plain_ddp_too():
    assert refused("recipe=sft", "trainer.auto_batch=true", config="ddp").key == "trainer.auto_batch"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["recipe=sft", "trainer.grad_accum=2", "trainer.save_every=0"], "trainer.grad_accum"),
        (["recipe=sft", "trainer.grad_accum=1", "trainer.save_every=5"], "trainer.save_every"),
    ],
)
def test_what_deepspeed_does_not_run_is_a_config_error(overrides, key):
    pytest.importorskip("deepspeed", reason="without deepspeed every DeepSpeed config is refused for that")
    assert refused(*overrides, config="deepspeed_zero3").key == key


TRAINING_METHODS = [name for name, spec in METHODS.items() if spec.runner == "train"]  # each has its recipe


@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
@pytest.mark.parametrize("recipe", [*TRAINING_METHODS, "lora", "ipo"])
def test_deepspeed_runs_every_training_method(recipe, config):
    """Each runs under ZeRO-3 in tests/recipes/test_sharded.py (and some under ZeRO-2 in docs/distributed.md)."""
    pytest.importorskip("deepspeed", reason="without deepspeed every DeepSpeed config is refused for that")
    run = run_config(f"recipe={recipe}", "trainer.grad_accum=1", "trainer.save_every=0", config=config)
    check_launch(run, None)


def test_the_ranks_read_the_strategy_the_launcher_asked_for(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert requested_strategy() == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert requested_strategy() == "fsdp2"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(TrainingError, match="fsdp_version 1 was requested; polmctl runs FSDP2 only"):
        requested_strategy()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert requested_strategy() == "deepspeed_zero3"


def test_a_model_prepared_as_another_strategy_stops_the_run():
    """What happened before: FSDP asked for, the model came out of prepare() unsharded (DDP)."""
    strategy = Strategy("fsdp2", processes=2, backend="gloo", device="cpu")
    with pytest.raises(TrainingError, match="fsdp2 was requested but the model was prepared as single"):
        strategy.confirm(torch.nn.Linear(2, 2))
    ddp = Strategy("ddp", processes=1, backend=None, device="cpu")
    with pytest.raises(TrainingError, match="polmctl does not run a substitute"):
        ddp.confirm(torch.nn.Linear(2, 2))
    same = Strategy("single", processes=1, backend=None, device="cpu")
    same.confirm(torch.nn.Linear(2, 2))
    assert same.record()["strategy"] == "single" and same.record()["checkpoints"] == "full (rank 0)"
