"""``polmctl runs`` and ``polmctl compare`` on a real two-job sweep and on run dirs that other
runners, failures and interruptions leave behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import polmctl.cli as cli

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two sft runs on model=tiny laid out as ``polmctl run -m ... trainer.lr=1e-3,2e-3 hydra.sweep.dir=sw``
    lays them out (sw/0, sw/1 with .hydra/config.yaml and overrides.yaml), trained in-process to
    spare two process starts (tests/test_cli.py runs a real sweep)."""
    from omegaconf import OmegaConf

    from polmctl.compose import compose_config
    from polmctl.runners.train import run_train
    from polmctl.validate import validate

    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLMCTL_CACHE", str(root / "cache"))
        for num, lr in enumerate(("0.001", "0.002")):
            job = root / "sw" / str(num)
            overrides = ["recipe=sft", "model=tiny", "debug=quick", "eval=none", "data.max_rows=32", f"trainer.lr={lr}"]
            cfg = compose_config([*overrides, "logger.progress=false", f"output_dir={job}"])
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            run_train(validate(cfg))
    return root / "sw"


@pytest.fixture()
def polmctl(monkeypatch):
    monkeypatch.setattr(cli.out, "width", 250)  # no wrapping inside the cells asserted on

    def invoke(*args: str, input: str | None = None):
        return CliRunner().invoke(cli.app, list(args), input=input)

    return invoke


def fake_run(path: Path, *, overrides=(), config=None, summary=None, metrics_lines=(), mtime=None) -> Path:
    """A run dir as a runner leaves it: .hydra/{config,overrides}.yaml, optionally summary.json and metrics.jsonl."""
    (path / ".hydra").mkdir(parents=True)
    cfg = {
        "runner": "train",
        "recipe": {"name": "sft"},
        "model": {"name_or_path": "builtin:tiny"},
        "output_dir": "${hydra:runtime.output_dir}",
        **(config or {}),
    }
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if metrics_lines:
        (path / "metrics.jsonl").write_text("\n".join(metrics_lines) + "\n")
    if mtime is not None:
        os.utime(path / ".hydra" / "config.yaml", (mtime, mtime))
    return path


def test_help_of_each_command_has_an_example(polmctl):
    for command in ("runs", "compare"):
        result = polmctl(command, "--help")
        assert result.exit_code == 0 and f"polmctl {command}" in result.output


def test_runs_lists_the_sweep_jobs_with_overrides_status_and_final_loss(polmctl, sweep):
    result = polmctl("runs", str(sweep), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 2
    assert [r["started"] for r in rows] == sorted((r["started"] for r in rows), reverse=True)
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert row["status"] == "completed" and row["steps"] == 4 and row["recipe"] == "sft"
        assert row["model"] == "builtin:tiny" and row["runner"] == "train"
        assert row["metrics"]["final_loss"] == summary["final_loss"]
        assert row["wall_time_s"] == summary["wall_time_s"] and row["wall_time_measured"]
        assert not any(o.startswith(("recipe=", "model=")) for o in row["overrides"])  # own columns
    assert sorted(o for r in rows for o in r["overrides"] if o.startswith("trainer.lr")) == [
        "trainer.lr=0.001",
        "trainer.lr=0.002",
    ]

    table = polmctl("runs", str(sweep))
    assert table.exit_code == 0
    assert "trainer.lr=0.002" in table.stdout and "completed" in table.stdout
    assert f"final_loss {rows[0]['metrics']['final_loss']:.4g}" in table.stdout


def test_runs_reads_failed_interrupted_and_other_runners_defensively(polmctl, tmp_path):
    root = tmp_path / "outputs"
    step = {"loss": 2.5, "lr": 1e-3, "step": 1}
    fake_run(root / "failed", mtime=1_000)  # died before writing anything
    fake_run(
        root / "killed",
        metrics_lines=[json.dumps(step), json.dumps({**step, "step": 2, "loss": 2.0}), '{"loss": 1.'],
        mtime=2_000,
    )  # half-written last line
    fake_run(
        root / "quantized",
        config={"runner": "quantize", "recipe": {"name": "quantize"}},
        mtime=3_000,
        summary={
            "status": "completed",
            "wall_time_s": 12.5,
            "size_on_disk_bytes": {"ratio": 0.31},
            "eval": {
                "before": {"arithmetic": {"accuracy": 0.5, "n": 8}},
                "after": {"arithmetic": {"accuracy": 0.25, "n": 8}},
            },
        },
    )
    fake_run(root / "no-status", summary={"final_loss": 1.5}, mtime=4_000)
    fake_run(
        root / "merged",
        config={"runner": "merge", "recipe": {"name": "merge"}},
        mtime=4_500,
        summary={"status": "completed", "eval": {"merged": {"reversal": {"accuracy": 0.75, "n": 8}}, "sources": None}},
    )
    fake_run(
        root / "pipeline",
        config={"runner": "pipeline"},
        mtime=5_000,
        summary={
            "runner": "pipeline",
            "status": "failed",
            "failed_stage": "dpo",
            "stages": [
                {
                    "name": "sft",
                    "status": "completed",
                    "metrics": {"final_loss": 0.75},
                    "eval": {"before": None, "after": {"arithmetic": {"accuracy": 0.5}}},
                },
                {"name": "dpo", "status": "failed", "metrics": {}, "eval": {}},
            ],
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text(json.dumps({"status": "completed", "final_loss": 0.5, "steps": 9}))
    fake_run(root / "moved", config={"output_dir": str(elsewhere)}, mtime=6_000)
    fake_run(root / "gone", config={"output_dir": str(tmp_path / "deleted")}, mtime=7_000)
    (root / "broken" / ".hydra").mkdir(parents=True)
    (root / "broken" / ".hydra" / "config.yaml").write_text("{not: [yaml")
    os.utime(root / "broken" / ".hydra" / "config.yaml", (500, 500))

    result = polmctl("runs", str(root), "--json")
    assert result.exit_code == 0, result.output
    rows = {Path(r["run_dir"]).name: r for r in json.loads(result.stdout)}
    assert list(rows) == [
        "deleted",
        "elsewhere",
        "pipeline",
        "merged",
        "no-status",
        "quantized",
        "killed",
        "failed",
        "broken",
    ]
    assert rows["failed"]["status"] == "incomplete" and rows["failed"]["steps"] is None
    assert rows["killed"]["status"] == "incomplete" and rows["killed"]["steps"] == 2
    assert rows["killed"]["metrics"] == {"loss": 2.0}
    assert rows["quantized"]["metrics"] == {"arithmetic/accuracy": 0.25, "size_on_disk_bytes.ratio": 0.31}
    assert rows["quantized"]["metrics_before"] == {"arithmetic/accuracy": 0.5}
    assert rows["quantized"]["recipe"] == "quantize" and rows["quantized"]["wall_time_s"] == 12.5
    assert rows["merged"]["metrics"] == {"reversal/accuracy": 0.75} and rows["merged"]["metrics_before"] == {}
    assert rows["no-status"]["status"] == "finished" and rows["no-status"]["metrics"] == {"final_loss": 1.5}
    assert rows["pipeline"]["status"] == "failed (stage dpo)"
    assert rows["pipeline"]["metrics"] == {"arithmetic/accuracy": 0.5, "final_loss": 0.75}
    assert rows["elsewhere"]["status"] == "completed" and rows["elsewhere"]["steps"] == 9
    assert rows["deleted"]["status"] == "output_dir gone"
    assert rows["broken"]["recipe"] == "?" and rows["broken"]["status"] == "incomplete"

    table = polmctl("runs", str(root))
    assert table.exit_code == 0
    assert "arithmetic/accuracy 0.5->0.25" in table.stdout and "failed (stage dpo)" in table.stdout


def test_runs_without_runs_or_dirs(polmctl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = polmctl("runs")
    assert missing.exit_code == 2 and "no outputs/ or multirun/" in missing.stderr
    assert "Traceback" not in missing.output
    bad = polmctl("runs", "nowhere")
    assert bad.exit_code == 2 and "nowhere: no such directory" in bad.stderr
    (tmp_path / "outputs").mkdir()
    empty = polmctl("runs", "--json")
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []


def test_compare_a_sweep_writes_a_plot_and_labels_jobs_by_their_override(polmctl, sweep):
    from matplotlib.image import imread

    result = polmctl("compare", str(sweep), "--metric", "loss", "--metric", "grad_norm")
    assert result.exit_code == 0, result.output
    png = sweep / "compare-loss-grad_norm.png"
    assert f"plot: {png}" in result.stdout
    height, width, _ = imread(png).shape
    assert (width, height) == (960, 768)  # 8 x 3.2 in per panel, two panels, 120 dpi
    for job, lr in (("0", "0.001"), ("1", "0.002")):
        steps = [json.loads(line) for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        row = next(line for line in result.stdout.splitlines() if f"trainer.lr={lr}" in line)
        assert f"{steps[0]['loss']:.4g}->{steps[-1]['loss']:.4g}" in row
        assert f"{steps[0]['grad_norm']:.4g}->{steps[-1]['grad_norm']:.4g}" in row


def test_compare_named_runs_to_an_out_path(polmctl, sweep, tmp_path):
    other = fake_run(
        tmp_path / "mine", metrics_lines=[json.dumps({"loss": 3.0, "step": 1}), json.dumps({"loss": "nan", "step": 2})]
    )
    out = tmp_path / "plots" / "mine.png"
    result = polmctl("compare", str(sweep / "0"), str(other), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3->nan" in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--metric", "nope"], "--metric nope: no run logged it in metrics.jsonl; logged metrics: loss, lr"),
        (["/no/such/dir"], "/no/such/dir: no such directory"),
    ],
)
def test_compare_bad_input_is_one_line(polmctl, sweep, args, needle):
    full = [str(sweep), *args] if args[0].startswith("--") else args
    result = polmctl("compare", *full)
    assert result.exit_code == 2
    assert needle in result.stderr and "Traceback" not in result.output


def test_compare_runs_that_logged_no_steps(polmctl, tmp_path):
    fake_run(tmp_path / "sweep" / "0", summary={"status": "completed"})
    empty = polmctl("compare", str(tmp_path / "sweep"))
    assert empty.exit_code == 2 and "none of these runs logged any steps" in empty.stderr
    (tmp_path / "plain").mkdir()
    none = polmctl("compare", str(tmp_path / "plain"))
    assert none.exit_code == 2 and "holds no runs" in none.stderr
