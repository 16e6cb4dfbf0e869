"""The command-line surface, run as a user runs it (a subprocess of the installed script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cli

POLMCTL = [sys.executable, "-m", "polmctl"]
TINY = ["model=tiny", "debug=quick", "eval=none", "data.max_rows=32"]


def polmctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*POLMCTL, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_help_explains_itself_with_examples():
    top = polmctl("--help")
    assert top.returncode == 0
    for command in ("run", "recipes", "show", "eval"):
        assert command in top.stdout
    assert "polmctl run recipe=lora" in top.stdout
    for command in ("run", "recipes", "show", "eval"):
        sub = polmctl(command, "--help")
        assert sub.returncode == 0 and "polmctl " + command in sub.stdout.replace("\n", " "), command


def test_recipes_lists_every_recipe_with_its_paradigm():
    result = polmctl("recipes")
    assert result.returncode == 0
    for name in ("sft", "lora", "qlora", "dora", "prompt_tuning", "prefix_tuning", "continued_pretraining"):
        assert name in result.stdout
    assert "fine-tuning" in result.stdout


def test_recipes_never_cuts_a_recipe_name_in_an_80_column_terminal():
    from polmctl.cli import recipe_infos

    result = subprocess.run(
        [*POLMCTL, "recipes"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    first_cells = {line.split("│")[1].strip() for line in lines if line.startswith("│")}
    assert {r["name"] for r in recipe_infos()} <= first_cells  # each name whole, on one line


def test_show_prints_the_composed_config():
    result = polmctl("show", "recipe=dora", "trainer.lr=1e-4", "model=tiny")
    assert result.returncode == 0, result.stderr
    assert "method: dora" in result.stdout and "lr: 0.0001" in result.stdout and "builtin:tiny" in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["show", "trainer.lr=-1"], "trainer.lr: must be > 0"),
        (["show", "recipe=nope"], "Available options in 'recipe'"),
        (["run", "recipe=lora", "peft.r=0", *TINY], "peft.r: must be > 0"),
    ],
)
def test_bad_config_exits_non_zero_with_one_line(args, needle, tmp_path):
    result = polmctl(*args, cwd=tmp_path)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert needle in text and "Traceback" not in text
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


def test_bad_data_source_is_one_line_naming_the_file(tmp_path):
    result = polmctl("run", "recipe=sft", *TINY, "data.source=missing.jsonl", cwd=tmp_path)
    assert result.returncode != 0
    assert "missing.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_run_writes_the_run_dir(tmp_path):
    result = polmctl("run", "recipe=lora", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = list((tmp_path / "outputs" / "lora").glob("*/*"))
    for name in (
        ".hydra/config.yaml",
        "metrics.jsonl",
        "final/adapter_config.json",
        "summary.json",
        "checkpoints/step-4/trainer_state.pt",
    ):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_multirun_with_two_values_makes_two_runs(tmp_path):
    result = polmctl("run", "-m", "recipe=sft", *TINY, "trainer.lr=1e-3,2e-3", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"]
    overrides = [(p.parent / ".hydra" / "overrides.yaml").read_text() for p in summaries]
    assert "trainer.lr=0.001" in overrides[0] and "trainer.lr=0.002" in overrides[1]


def test_cfg_job_prints_without_running(tmp_path):
    result = polmctl("run", "recipe=lora", "model=tiny", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "method: lora" in result.stdout and not (tmp_path / "outputs").exists()


def test_eval_command_evaluates_a_model(tmp_path):
    result = polmctl("eval", "builtin:tiny", "eval.max_samples=4", "eval.max_new_tokens=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (summary,) = list((tmp_path / "outputs" / "eval").glob("*/*/summary.json"))
    assert 0.0 <= json.loads(summary.read_text())["eval"]["arithmetic"]["accuracy"] <= 1.0


def test_eval_on_a_checkpoint_points_to_export_before_making_a_run_dir(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import polmctl.cli as cli

    monkeypatch.chdir(tmp_path)
    step = tmp_path / "run" / "checkpoints" / "step-12"
    step.mkdir(parents=True)
    (step / "trainable.safetensors").write_bytes(b"")
    result = CliRunner().invoke(cli.app, ["eval", str(step)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert message.startswith(f"error: {step} is a training checkpoint")
    assert f"polmctl export {step} --out exported/step-12" in message
    assert not (tmp_path / "outputs").exists()


def test_no_pytree_warnings_before_a_command_s_output():
    """Importing torchao's enums made torch log two _pytree deprecation warnings before every command."""
    result = polmctl("show", "recipe=lora", "model=tiny")
    assert result.returncode == 0, result.stderr
    assert "_pytree" not in result.stderr and "Enum subclass" not in result.stderr
    # nor the optional native kernels' load failures (torchao's CUDA extensions, bitsandbytes' hub kernel)
    assert "Failed to load" not in result.stderr
