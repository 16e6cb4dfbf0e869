"""Compare runs: a table of their metrics and a PNG of chosen metrics over steps.

    polmctl compare multirun/2026-11-25/10-00-00                   # every job of a sweep
    polmctl compare outputs/sft/2026-11-25/10-00-00 outputs/lora/2026-11-25/11-00-00 --metric loss --metric lr

Runs are labelled by the overrides that differ between them (``trainer.lr=0.001``). The PNG
goes to the runs' common parent dir (``--out`` to choose) and its path is printed.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from polmctl.commands.runs import (
    RunInfo,
    display_path,
    find_run_dirs,
    fmt_duration,
    fmt_metrics,
    fmt_number,
    is_run_dir,
    read_metrics_lines,
    read_run,
)
from polmctl.errors import CommandError


def expand_runs(paths: list[Path]) -> list[Path]:
    """Run dirs as given; any other dir (a sweep, outputs/...) becomes the top-level runs under it."""
    dirs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise CommandError(f"{path}: no such directory; give run dirs or a sweep dir (multirun/<date>/<time>)")
        if is_run_dir(path):
            dirs.append(path)
            continue
        found = find_run_dirs(path)
        if not found:
            raise CommandError(f"{path} holds no runs (no .hydra/config.yaml under it); give run dirs or a sweep dir")
        # A pipeline's stages are runs inside a run: compare the pipelines, not their stages.
        dirs += [d for d in found if not any(parent in found for parent in d.parents)]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def labels(runs: list[RunInfo], parent: Path) -> list[str]:
    """Each run's overrides that differ between the runs, else its path under ``parent``."""
    parsed = [dict(o.split("=", 1) for o in r.all_overrides if "=" in o) for r in runs]
    keys = dict.fromkeys(k for p in parsed for k in p)
    differ = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    names = [" ".join(f"{k}={p[k]}" for k in differ if k in p) for p in parsed]
    if len(runs) > 1 and len(set(names)) == len(names) and all(names):
        return names
    return [str(r.dir.relative_to(parent)) if r.dir != parent else r.dir.name for r in runs]


def step_series(rows: list[dict[str, Any]], metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``metric``; non-finite values (logged as "nan"/"inf" strings) become NaN gaps."""
    steps, values = [], []
    for i, row in enumerate(rows):
        if metric not in row:
            continue
        value = row[metric]
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        step = row.get("step")
        steps.append(float(step) if isinstance(step, (int, float)) else float(i + 1))
        values.append(value)
    return steps, values


def logged_metrics(series_rows: list[list[dict[str, Any]]]) -> list[str]:
    """The numeric keys any run logged per step (step itself excluded)."""
    keys: dict[str, None] = {}
    for rows in series_rows:
        for row in rows:
            keys.update(
                (k, None) for k, v in row.items() if k != "step" and isinstance(v, (int, float, str)) and _floatable(v)
            )
    return list(keys)


def _floatable(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def check_metrics(metrics: list[str], available: list[str]) -> None:
    if not available:
        raise CommandError(
            "none of these runs logged any steps (no metrics.jsonl rows; runners like quantize and "
            "prune log none): polmctl runs DIR shows their summaries"
        )
    missing = [m for m in metrics if m not in available]
    if missing:
        raise CommandError(
            f"--metric {missing[0]}: no run logged it in metrics.jsonl; logged metrics: {', '.join(available)}"
        )


def plot_path(out: Path | None, parent: Path, metrics: list[str]) -> Path:
    if out is not None:
        return out if out.suffix.lower() == ".png" else out / f"compare-{_slug(metrics)}.png"
    return parent / f"compare-{_slug(metrics)}.png"


def _slug(metrics: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(metrics))


def plot(series: dict[str, list[tuple[list[float], list[float]]]], names: list[str], path: Path, title: str) -> None:
    """One panel per metric, one line per run."""
    try:
        from matplotlib.figure import Figure  # a bare Figure renders with Agg: no GUI backend, no global state
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CommandError(
            "polmctl compare plots with matplotlib, which is not installed: "
            "pip install 'polmctl[plot]' (or pip install matplotlib)"
        ) from None
    fig = Figure(figsize=(8, 3.2 * len(series)), layout="constrained")
    axes = fig.subplots(len(series), 1, squeeze=False)[:, 0]
    for ax, (metric, per_run) in zip(axes, series.items()):
        for name, (steps, values) in zip(names, per_run):
            if steps:
                ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_ylabel(metric)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize="small")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise CommandError(
            f"cannot write the plot to {path} ({err.strerror or err}); choose another path with --out"
        ) from None


def compare(paths: list[Path], metrics: list[str], out: Path | None):
    """(the metrics table, the PNG path) for the runs at or under ``paths``."""
    from rich.table import Table
    from rich.text import Text

    dirs = expand_runs(paths)
    parent = Path(os.path.commonpath(dirs))
    runs = [read_run(d) for d in dirs]
    rows = [read_metrics_lines(d / "metrics.jsonl") for d in dirs]
    check_metrics(metrics, logged_metrics(rows))
    names = labels(runs, parent)
    series = {m: [step_series(r, m) for r in rows] for m in metrics}

    table = Table(title=f"{len(runs)} runs under {display_path(parent)}", title_justify="left")
    for col in ("run", "recipe", "status", "steps", "wall", *(f"{m} first->last" for m in metrics), "final metrics"):
        table.add_column(col, overflow="fold")
    for i, (run, name) in enumerate(zip(runs, names)):
        trend = []
        for m in metrics:
            values = series[m][i][1]
            trend.append(f"{_fmt(values[0])}->{_fmt(values[-1])}" if values else "-")
        cells = [
            name,
            run.recipe,
            run.status,
            fmt_number(run.steps),
            fmt_duration(run.wall_time_s),
            *trend,
            fmt_metrics(run),
        ]
        table.add_row(*(Text(c) for c in cells))

    path = plot_path(out, parent, metrics)
    plot(series, names, path, f"{', '.join(metrics)}: {display_path(parent)}")
    return table, path


def _fmt(value: float) -> str:
    return fmt_number(value) if math.isfinite(value) else str(value)
