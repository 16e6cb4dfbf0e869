"""Sweeps: the metric a run reports to a sweeper, the sweep summary, and missing Hydra plugins.

    polmctl run -m recipe=dpo method.beta=0.05,0.1 trainer.lr=1e-5,5e-6        # a grid; writes sweep_summary.json
    polmctl run -m recipe=sft hydra/launcher=joblib hydra.launcher.n_jobs=2     # jobs in parallel processes
    polmctl run -m recipe=sft hydra/sweeper=tune sweep.metric=final_loss        # Optuna search (conf/hydra/sweeper)

``sweep.metric`` (a dotted path in summary.json) is what every job returns to the sweeper and
what the summary ranks jobs by. ``SweepSummary`` is a Hydra callback (registered in
conf/config.yaml) that runs in the launching process once all jobs are done; it reads each
job's ``.hydra/overrides.yaml`` and ``summary.json`` from disk, so it works whatever launcher
ran the jobs (in process, joblib, submitit, ray).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from polmctl.config.schema import RunConfig
from polmctl.errors import ConfigError

# config group option -> (Hydra plugin module, library it drives, polmctl extra that installs both)
PLUGINS: dict[str, tuple[str, str, str]] = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib", "sweeps"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit", "slurm"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit", "slurm"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit", "slurm"),
    "hydra/launcher=ray": ("hydra_plugins.hydra_ray_launcher", "ray", "ray"),
    "hydra/launcher=ray_aws": ("hydra_plugins.hydra_ray_launcher", "ray", "ray"),
    "hydra/launcher=ray_cluster": ("hydra_plugins.hydra_ray_launcher", "ray", "ray"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna", "sweeps"),
    "hydra/sweeper=tune": ("hydra_plugins.hydra_optuna_sweeper", "optuna", "sweeps"),
}
_GROUP_ARG = re.compile(r"^\+{0,2}(hydra/(?:launcher|sweeper))=(\S+)$")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (import blocked)
        return False


def missing_plugin(args: Iterable[str]) -> Optional[str]:
    """One line naming the extra to install when an arg selects a launcher/sweeper that is not installed."""
    for arg in args:
        match = _GROUP_ARG.match(arg)
        if not match or f"{match[1]}={match[2]}" not in PLUGINS:
            continue
        plugin, library, extra = PLUGINS[f"{match[1]}={match[2]}"]
        absent = [m for m in (plugin, library) if not _importable(m)]
        if absent:
            return f"{arg} needs {' and '.join(absent)} (not installed); install with: pip install 'polmctl[{extra}]'"
    return None


def metric_paths(summary: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a summary as ``dotted.path -> value`` (bools and NaN left out)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(metric_paths(value, path + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            out[path] = value
    return out


def metric_at(summary: dict, path: str) -> Optional[float]:
    value: Any = summary
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _optimizing_sweeper() -> bool:
    """True inside a job launched by a sweeper that reads return values (Optuna, ...), not the grid sweeper."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    target = str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")
    return hydra_cfg.mode == RunMode.MULTIRUN and bool(target) and not target.endswith("BasicSweeper")


def check_sweep_metric(run: RunConfig) -> None:
    """Before training: an optimised eval metric must come from an eval task this run runs."""
    parts = run.sweep.metric.split(".")
    if not _optimizing_sweeper() or parts[0] != "eval" or len(parts) < 3 or parts[1] not in ("before", "after"):
        return
    if parts[2] not in run.eval.tasks or (parts[1] == "before" and not run.eval.before):
        raise ConfigError(
            "sweep.metric",
            f"{run.sweep.metric!r} needs eval task {parts[2]!r} run {parts[1]} "
            f"training; eval.tasks is {run.eval.tasks}, eval.before is {run.eval.before}",
        )


def sweep_objective(run: RunConfig, summary: Any) -> Optional[float]:
    """The run's ``sweep.metric`` for the sweeper; a sweeper that needs it gets a clear error when it is absent."""
    value = metric_at(summary, run.sweep.metric) if isinstance(summary, dict) else None
    if value is None and _optimizing_sweeper():
        available = ", ".join(metric_paths(summary)) if isinstance(summary, dict) else "none"
        raise ConfigError(
            "sweep.metric", f"{run.sweep.metric!r} is not a number in this run's summary.json; available: {available}"
        )
    return value


# -- the sweep summary ----------------------------------------------------------------------


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = sorted(p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra")
    # A job's own nested runs (e.g. pipeline stages) are part of that job, not jobs of the sweep.
    return [d for d in dirs if not any(o != d and o in d.parents for o in dirs)]


def _job_record(job_dir: Path, metric: str) -> dict[str, Any]:
    overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num") if hydra_yaml.is_file() else None
    summary_path = job_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "num": num,
        "dir": str(job_dir),
        "overrides": overrides,
        "status": summary.get("status", "completed" if summary else "no summary.json"),
        "value": metric_at(summary, metric),
        "metrics": metric_paths(summary),
    }


def summarize_sweep(sweep_dir: Path, metric: str, direction: str) -> dict[str, Any]:
    """Read every job under ``sweep_dir`` and write ``sweep_summary.json``; returns what it wrote."""
    jobs = sorted(
        (_job_record(d, metric) for d in _job_dirs(sweep_dir)),
        key=lambda j: (j["num"] is None, j["num"] if j["num"] is not None else 0, j["dir"]),
    )
    scored = [j for j in jobs if j["value"] is not None]
    best = (max if direction == "maximize" else min)(scored, key=lambda j: j["value"]) if scored else None
    summary: dict[str, Any] = {
        "sweep_dir": str(sweep_dir),
        "metric": metric,
        "direction": direction,
        "best": best and {k: best[k] for k in ("num", "dir", "overrides", "value")},
        "jobs": jobs,
    }
    optimizer = sweep_dir / "optimization_results.yaml"
    if optimizer.is_file():
        summary["optimizer"] = OmegaConf.to_container(OmegaConf.load(optimizer))
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def swept_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (all of them when there is one job)."""
    parsed = [dict(o.split("=", 1) for o in j["overrides"] if "=" in o) for j in jobs]
    keys = list(dict.fromkeys(k for p in parsed for k in p))
    if len(parsed) < 2:
        return keys
    return [k for k in keys if len({p.get(k) for p in parsed}) > 1]


def sweep_table(summary: dict[str, Any]):
    from rich.table import Table

    jobs, metric = summary["jobs"], summary["metric"]
    keys = swept_keys(jobs)
    best_dir = summary["best"] and summary["best"]["dir"]
    # Besides the swept metric: the final loss and accuracies after training, where jobs report them.
    extra = [
        m
        for m in dict.fromkeys(k for j in jobs for k in j["metrics"])
        if m != metric and (m == "final_loss" or (m.startswith("eval.after.") and m.endswith(".accuracy")))
    ]
    table = Table(
        title=f"sweep: {len(jobs)} jobs, best {metric} ({summary['direction']}) marked *", title_justify="left"
    )
    for col in ("job", *keys, "status", metric, *extra):
        table.add_column(col, justify="left" if col in (*keys, "status") else "right", overflow="fold")
    for job in jobs:
        values = dict(o.split("=", 1) for o in job["overrides"] if "=" in o)
        score = "-" if job["value"] is None else f"{job['value']:.4g}" + (" *" if job["dir"] == best_dir else "")
        others = [f"{job['metrics'][m]:.4g}" if m in job["metrics"] else "-" for m in extra]
        table.add_row(
            str(job["num"] if job["num"] is not None else Path(job["dir"]).name),
            *(values.get(k, "") for k in keys),
            job["status"],
            score,
            *others,
        )
    return table


class SweepSummary(Callback):
    """After a multirun, write ``<sweep dir>/sweep_summary.json`` and print a table of the jobs."""

    def __init__(self) -> None:
        self.sweep_dir: Optional[Path] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Resolved now, once: the dir holds ${now:...}, which must name the same dir at the end.
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from polmctl.console import console

        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        metric = OmegaConf.select(config, "sweep.metric", default="final_loss")
        direction = OmegaConf.select(config, "sweep.direction", default="minimize")
        summary = summarize_sweep(sweep_dir, metric, direction)
        console.print(sweep_table(summary))
        console.print(f"sweep summary: {sweep_dir.resolve() / 'sweep_summary.json'}", highlight=False, soft_wrap=True)
