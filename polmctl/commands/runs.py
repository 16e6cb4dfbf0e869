"""Find run dirs and read what they hold: the table of ``polmctl runs``, newest first.

    polmctl runs                                   # every run under ./outputs and ./multirun
    polmctl runs multirun/2026-11-25/10-00-00      # one sweep
    polmctl runs outputs --json                    # the same rows as JSON

A run dir is any dir that holds ``.hydra/config.yaml`` (Hydra writes it as the job starts), so
failed and interrupted runs are found too; pipeline stages are run dirs inside their pipeline's.
Status: "running" while a live process holds the run dir's lock; "failed" or "interrupted" as the
run's summary.json says (an error or Ctrl-C); "incomplete" for a run that wrote no summary (killed).
Every runner writes its own summary.json keys, and a killed run may have none or a half-written
metrics line, so every file is read defensively and only what is there is shown.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polmctl.engine.rundir import read_holder
from polmctl.errors import CommandError

DEFAULT_ROOTS = ("outputs", "multirun")
# Overrides shown in their own column, not among the key overrides.
OWN_COLUMNS = ("recipe", "model", "model.name_or_path")
# Headline numbers of runners other than train (quantize, prune, pipeline...), dotted, when present.
HEADLINE_KEYS = (
    "objective",
    "sparsity.overall",
    "layers.after",
    "params.after",
    "size_on_disk_bytes.ratio",
    "param_memory_bytes.ratio",
    "tokens_per_s.ratio",
    "calibration.perplexity_after",
)
# Eval entries that count things rather than measure them.
NOT_METRICS = ("n", "tokens")


@dataclass
class RunInfo:
    dir: Path
    recipe: str
    runner: str
    model: str
    overrides: list[str]  # the key overrides: all but those shown in their own column
    status: str
    started: float  # epoch seconds: when Hydra wrote .hydra/config.yaml
    wall_time_s: float | None
    wall_time_measured: bool  # False: estimated from the last file the run wrote
    steps: int | None
    metrics: dict[str, float] = field(default_factory=dict)  # final numbers: eval after, final loss, ...
    before: dict[str, float] = field(default_factory=dict)  # eval before training, same keys as metrics
    all_overrides: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.dir),
            "recipe": self.recipe,
            "runner": self.runner,
            "model": self.model,
            "overrides": self.overrides,
            "status": self.status,
            "started": _iso(self.started),
            "wall_time_s": self.wall_time_s,
            "wall_time_measured": self.wall_time_measured,
            "steps": self.steps,
            "metrics": self.metrics,
            "metrics_before": self.before,
        }


def find_run_dirs(root: Path) -> list[Path]:
    """Every run dir at or under ``root`` (sorted by path)."""
    return sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")})


def is_run_dir(path: Path) -> bool:
    """A Hydra run dir, or a dir a runner wrote into without Hydra (output_dir=...)."""
    return any((path / name).is_file() for name in (".hydra/config.yaml", "summary.json", "metrics.jsonl"))


def _runner_of(config: dict) -> str:
    """The runner of a recorded config's method (runs recorded before the runner followed from the
    method have a ``runner`` key instead)."""
    from polmctl.methods.registry import METHODS

    name = _get(config, "method.name")
    return METHODS[name].runner if name in METHODS else "?"


def read_run(run_dir: Path) -> RunInfo:
    """What ``run_dir`` holds. A run whose ``output_dir=`` pointed elsewhere is read from there."""
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    config = config if isinstance(config, dict) else {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    marker = next((p for p in (run_dir / ".hydra" / "config.yaml", run_dir / "metrics.jsonl") if p.is_file()), run_dir)
    started = marker.stat().st_mtime
    data_dir, missing = output_dir(config, run_dir)
    summary = _read_summary(data_dir / "summary.json")
    known = summary or {}
    steps_log = read_metrics_lines(data_dir / "metrics.jsonl")

    recipe = _get(config, "recipe.name") or known.get("recipe") or "?"
    model = _get(config, "model.name_or_path") or known.get("model") or "?"
    runner = _get(config, "runner") or known.get("runner") or _runner_of(config)
    wall = known.get("wall_time_s")
    measured = _number(wall)
    if not measured:
        written = (
            [p.stat().st_mtime for p in data_dir.iterdir() if p.is_file() and p.stat().st_size] if not missing else []
        )
        wall = max(written) - started if written and max(written) > started else None
    steps = known.get("steps")
    if not isinstance(steps, int) and steps_log:
        steps = steps_log[-1].get("step")
    metrics, before = headline_metrics(summary, steps_log)
    status = "output_dir gone" if missing else run_status(summary, data_dir)
    return RunInfo(
        dir=data_dir,
        recipe=str(recipe),
        runner=str(runner),
        model=str(model),
        overrides=[o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in OWN_COLUMNS],
        status=status,
        started=started,
        wall_time_s=wall,
        wall_time_measured=measured,
        steps=steps if isinstance(steps, int) else None,
        metrics=metrics,
        before=before,
        all_overrides=overrides,
    )


def output_dir(config: dict, run_dir: Path) -> tuple[Path, bool]:
    """(where the runner wrote, whether that dir is missing): ``output_dir`` when set to a path, else the run dir."""
    value = config.get("output_dir")
    if not isinstance(value, str) or not value or "${" in value:
        return run_dir, False
    path = Path(value).expanduser()
    if not path.is_absolute():  # relative to where the command ran, which Hydra records
        cwd = _get(_read_yaml(run_dir / ".hydra" / "hydra.yaml"), "hydra.runtime.cwd")
        if not isinstance(cwd, str):
            return run_dir, False
        path = Path(cwd) / path
    if path.resolve() == run_dir.resolve():
        return run_dir, False
    return path, not path.is_dir()


def collect_runs(roots: list[Path]) -> list[RunInfo]:
    """The runs under ``roots``, newest first."""
    dirs = dict.fromkeys(d.resolve() for root in roots for d in find_run_dirs(root))
    found = {r.dir: r for r in (read_run(d) for d in dirs)}  # one row per output dir
    return sorted(found.values(), key=lambda r: r.started, reverse=True)


def runs_json(runs: list[RunInfo]) -> str:
    return json.dumps([r.as_json() for r in runs], indent=2)


def run_roots(dirs: list[Path] | None) -> list[Path]:
    """The dirs ``polmctl runs`` searches: those given, else ./outputs and ./multirun."""
    if dirs:
        for d in dirs:
            if not d.is_dir():
                raise CommandError(
                    f"{d}: no such directory; give a dir that holds run dirs (outputs, multirun, "
                    "a sweep dir or a run dir)"
                )
        return list(dirs)
    roots = [Path(d) for d in DEFAULT_ROOTS if Path(d).is_dir()]
    if not roots:
        raise CommandError(
            f"no {' or '.join(d + '/' for d in DEFAULT_ROOTS)} in {Path.cwd()}; run polmctl runs DIR "
            "with the dir your runs are in (see hydra.run.dir / hydra.sweep.dir)"
        )
    return roots


def run_status(summary: dict | None, run_dir: Path) -> str:
    holder = read_holder(run_dir)
    if holder is not None:  # a live run holds the dir, or a killed one left its lock file
        alive = holder.alive()
        if alive is None:
            return f"running on {holder.host}?"
        if alive:
            return "running"
    if summary is None:
        if (run_dir / "summary.json").exists():
            return "unreadable summary"
        # No summary: it failed before writing one, was killed, or is still running.
        return "incomplete"
    status = str(summary.get("status") or "finished")
    if status == "running":  # a pipeline writes it as it goes; no live holder: it was killed
        status = "incomplete"
    if summary.get("failed_stage"):
        status += f" (stage {summary['failed_stage']})"
    return status


def headline_metrics(summary: dict | None, steps_log: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """(final numbers, eval-before numbers with the same keys) of a run, from what it wrote."""
    metrics: dict[str, float] = {}
    before: dict[str, float] = {}
    summary = summary or {}
    if summary.get("runner") == "pipeline" and isinstance(summary.get("stages"), list):
        done = [s for s in summary["stages"] if isinstance(s, dict) and s.get("status") == "completed"]
        summary = {**(done[-1].get("metrics") or {}), "eval": done[-1].get("eval")} if done else {}
    for task, results in _eval_results(summary.get("eval"), "after").items():
        for name, value in results.items():
            if name not in NOT_METRICS and _number(value):
                metrics[f"{task}/{name}"] = value
    for task, results in _eval_results(summary.get("eval"), "before").items():
        for name, value in results.items():
            if f"{task}/{name}" in metrics and _number(value):
                before[f"{task}/{name}"] = value
    if _number(summary.get("final_loss")):
        metrics["final_loss"] = summary["final_loss"]
    elif steps_log and _number(steps_log[-1].get("loss")):
        metrics["loss"] = steps_log[-1]["loss"]  # no summary: the last logged step
    for key in HEADLINE_KEYS:
        value = _get(summary, key)
        if _number(value):
            metrics[key] = value
    return metrics, before


def _eval_results(evals: Any, tag: str) -> dict[str, dict]:
    """Train-style {before, after} results, a merge's {sources, merged} (merged as "after"), or the
    evaluate runner's plain results (as "after")."""
    if not isinstance(evals, dict):
        return {}
    if set(evals) <= {"sources", "merged"}:
        evals = {"after": evals.get("merged")}
    if set(evals) <= {"before", "after"}:
        evals = evals.get(tag)
    elif tag == "before":
        return {}
    return {k: v for k, v in (evals or {}).items() if isinstance(v, dict)}


def read_metrics_lines(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a line a killed run left half-written is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_summary(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).isoformat(timespec="seconds")


def fmt_number(value: Any) -> str:
    if not _number(value):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_metrics(run: RunInfo) -> str:
    """One line per final number; an eval measured before training too reads ``before->after``."""
    parts = []
    for key, value in run.metrics.items():
        old = run.before.get(key)
        parts.append(
            f"{key} {fmt_number(old)}->{fmt_number(value)}" if old is not None else f"{key} {fmt_number(value)}"
        )
    return "\n".join(parts) or "-"


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def runs_table(runs: list[RunInfo], title: str):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("started", "run dir", "recipe", "model", "overrides", "status", "steps", "wall", "final metrics"):
        table.add_column(
            col, overflow="fold", no_wrap=col in ("steps", "status"), justify="right" if col == "steps" else "left"
        )
    for run in runs:
        status_style = {"completed": "green", "finished": "green"}.get(
            run.status, "yellow" if run.status.startswith(("incomplete", "running", "interrupted")) else "red"
        )
        wall = fmt_duration(run.wall_time_s)
        cells = [
            dt.datetime.fromtimestamp(run.started).strftime("%m-%d %H:%M"),
            display_path(run.dir),
            run.recipe,
            run.model,
            " ".join(run.overrides) or "-",
            run.status,
            fmt_number(run.steps),
            wall if run.wall_time_measured or wall == "-" else f"~{wall}",
            fmt_metrics(run),
        ]
        # Text, not markup: overrides like eval.tasks=[a,b] would read as rich tags.
        table.add_row(*(Text(c, style=status_style if i == 5 else "") for i, c in enumerate(cells)))
    return table
