"""What every runner does around its own work: before, check that the rest of the run fits its
method, make the run dir and set the seed; after, write summary.json and print its table.

    polmctl run recipe=prune | quantize | merge | vlm_adapter | lora | ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.engine.metrics import write_json
from polmctl.engine.progress import summary_table
from polmctl.errors import ConfigError
from polmctl.validate import require_method


def begin(cfg: RunConfig, method: str, *, no_adapters: str | None = None, full_precision: str | None = None) -> Path:
    """The run dir of a ``method`` run, after checking what the method schema cannot see: with
    ``no_adapters`` (the reason, for the message) peft must be none, with ``full_precision`` the
    model must load unquantized."""
    require_method(cfg, method)
    if full_precision and cfg.model.quantization != "none":
        raise ConfigError("model.quantization", f"got {cfg.model.quantization!r}; {full_precision}")
    if no_adapters and cfg.peft.method != "none":
        raise ConfigError("peft.method", f"got {cfg.peft.method!r}; {no_adapters}")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    return run_dir


def finish(run_dir: Path, summary: dict[str, Any], title: str, rows: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` and print its table and the run dir; returns the summary."""
    write_json(run_dir / "summary.json", summary)
    console.print(summary_table(title, rows))
    console.print(f"run dir: {run_dir}", highlight=False, soft_wrap=True)
    return summary


def eval_rows(results: dict[str, dict | None], skip: tuple[str, ...] = ("n",)) -> dict[str, Any]:
    """Table rows ``task/metric (tag)`` of ``{"before": {task: {metric: value}}, "after": ...}``."""
    rows = {}
    for tag, tasks in results.items():
        for task, metrics in (tasks or {}).items():
            for name, value in metrics.items():
                if name not in skip:
                    rows[f"{task}/{name} ({tag})"] = value
    return rows
