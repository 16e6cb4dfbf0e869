"""What a run dir holds is data, never code; a resume with another model is refused before anything
loads, and the run's recorded config survives it (polmctl/engine/checkpoint.py, runners/common.py
check_resume, commands/export.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m reliability tests/reliability/test_hostile_checkpoints.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from polmctl.commands.export import export
from polmctl.compose import compose_config
from polmctl.engine.checkpoint import CheckpointError
from polmctl.engine.rundir import RunRefused
from polmctl.runners.train import run_train
from polmctl.validate import validate

from .conftest import ARGS

pytestmark = [pytest.mark.reliability, pytest.mark.recipes]

TWO_STEPS = [*ARGS, "trainer.max_steps=2", "data.max_rows=8"]


class WritesAMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def hydra_run(run_dir: Path, *overrides: str) -> dict:
    """run_train as under Hydra: .hydra/config.yaml and overrides.yaml are (re)written first."""
    args = [*TWO_STEPS, *overrides, f"output_dir={run_dir}"]
    cfg = compose_config(args)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    return run_train(validate(cfg))


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_a_crafted_trainer_state_is_refused_by_resume_and_never_read_by_export(tmp_path, resume):
    run_dir = tmp_path / "run"
    hydra_run(run_dir)
    ckpt = run_dir / "checkpoints" / "step-2"
    marker = tmp_path / "marker"
    torch.save({"step": 2, "optimizer": WritesAMarker(marker)}, ckpt / "trainer_state.pt")

    other = tmp_path / "other"
    with pytest.raises(CheckpointError, match=r"trainer_state.pt cannot be loaded safely \(it refers to"):
        hydra_run(run_dir if resume == "auto" else other, f"resume={'auto' if resume == 'auto' else ckpt}")
    assert not marker.exists()

    # export needs the weights only: trainer_state.pt is never opened
    export(str(ckpt), tmp_path / "exported")
    assert not marker.exists()
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    trained = load_file(str(ckpt / "trainable.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(exported[name], trained[name])


def test_resume_with_another_peft_shape_is_refused_and_the_recorded_config_survives(tmp_path):
    run_dir = tmp_path / "run"
    hydra_run(run_dir, "recipe=lora", "peft.r=8")
    recorded = {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()}
    summary, metrics = (run_dir / "summary.json").read_text(), (run_dir / "metrics.jsonl").read_text()
    ckpt = run_dir / "checkpoints" / "step-2"
    assert "r: 8" in (ckpt / "run_config.yaml").read_text() and (ckpt / "hydra" / "config.yaml").is_file()

    with pytest.raises(RunRefused) as err:
        hydra_run(run_dir, "recipe=lora", "peft.r=4", "resume=auto")
    message = str(err.value)
    assert "\n" not in message and "peft.r=8 (this run: 4)" in message and "was put back" in message
    assert {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()} == recorded  # Hydra's rewrite undone
    assert (run_dir / "summary.json").read_text() == summary and (run_dir / "metrics.jsonl").read_text() == metrics

    export(str(ckpt), tmp_path / "exported")  # the intact checkpoint still exports, as the r=8 adapter it is
    adapter = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
