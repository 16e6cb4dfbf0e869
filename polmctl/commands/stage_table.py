"""The table of a pipeline run: one row per stage and eval task, read from what the stages wrote.

    polmctl survey                     # writes survey/table.md and survey/table.json with these rows
    polmctl report outputs/compress/2026-11-25/10-00-00    # the same table at the top of the page

A row: the stage, its paradigm and recipe, the headline metric of one eval task and its held-out
set, before -> after, the stage's own working time (training, pruning, quantizing or merging) and
wall time, its peak memory and the size of its final/ weights on disk.

"before" is the stage's own evaluation of its input model when it made one (a merge: the best of its
sources). A stage that skipped it (``eval.before=false``: it would repeat an earlier stage's "after")
takes the "after" of the earlier stage whose output it started from (its model, or a merge's
method.models), on the same task and the same number of held-out rows; ``before_from`` names it.

Peak memory is what each stage's summary.json says. On CPU that is the process's peak resident
memory so far, and a pipeline runs its stages in one process: a stage shows at least the peak of the
stages before it in the same run (a resumed run starts a new process).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from polmctl.commands.runs import fmt_duration, fmt_number
from polmctl.errors import CommandError

# The held-out set of the common eval tasks when eval.source is unset, as polmctl/evals/__init__.py EVAL_TASKS
# has them (a test checks they agree) without importing it (torch and its kernels: seconds); other tasks are
# looked up there. The vlm runner's "vqa" reads the run's data.source.
DEFAULT_EVAL_SOURCES = {
    "arithmetic": "builtin:arithmetic",
    "reversal": "builtin:reversal",
    "perplexity": "builtin:domain_text",
    "preference": "builtin:arithmetic_preference",
    "reward": "builtin:style_preference",
}
HEADLINE_METRICS = ("accuracy", "perplexity")  # a task's headline metric: the first it has, else its first number
NOT_HEADLINE = ("n", "tokens", "chance")
LOWER_IS_BETTER = ("perplexity", "nll", "loss")
# The stage's own work, by runner: the first of these its summary.json has.
WORK_TIME_KEYS = ("train_time_s", "prune_time_s", "quantize_time_s", "merge_time_s")
RECIPES = Path(__file__).resolve().parents[1] / "conf" / "recipe"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
COLUMNS = (
    "stage",
    "paradigm",
    "recipe",
    "metric (held-out set)",
    "before -> after",
    "training time",
    "wall time",
    "peak memory",
    "model size",
)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def is_pipeline(summary: dict | None) -> bool:
    return bool(summary) and summary.get("runner") == "pipeline" and isinstance(summary.get("stages"), list)


def stage_dirs(run_dir: Path, summary: dict) -> list[Path]:
    """Each stage's run dir; a recorded path that no longer exists (the run dir moved) is looked up
    by its name inside ``run_dir``."""
    dirs = []
    for entry in summary["stages"]:
        recorded = Path(str(entry.get("run_dir") or ""))
        dirs.append(recorded if recorded.is_dir() else run_dir / recorded.name)
    return dirs


def eval_results(summary: dict | None) -> tuple[dict, dict, dict]:
    """(before, after, sources) of a run's eval results: {task: {metric: value}}, sources by model path.

    Train-style runs write {before, after}; a merge {merged, sources}; the evaluate runner plain results."""
    evals = (summary or {}).get("eval")
    if not isinstance(evals, dict):
        return {}, {}, {}
    if set(evals) <= {"merged", "sources"}:
        sources = {k: v for k, v in (evals.get("sources") or {}).items() if isinstance(v, dict)}
        return {}, _tasks(evals.get("merged")), sources
    if set(evals) <= {"before", "after"}:
        return _tasks(evals.get("before")), _tasks(evals.get("after")), {}
    return {}, _tasks(evals), {}


def _tasks(results: Any) -> dict:
    return {k: v for k, v in (results or {}).items() if isinstance(v, dict)} if isinstance(results, dict) else {}


def headline_metric(results: dict) -> str | None:
    for name in HEADLINE_METRICS:
        if _number(results.get(name)):
            return name
    return next((k for k, v in results.items() if k not in NOT_HEADLINE and _number(v)), None)


def better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def held_out(task: str, config: dict, n: Any) -> str:
    """Where a task's held-out rows came from, as the evaluation chose them (polmctl/evals/__init__.py eval_rows)."""
    data, evals = config.get("data") or {}, config.get("eval") or {}
    source = evals.get("source") or DEFAULT_EVAL_SOURCES.get(task) or _task_source(task) or data.get("source") or "?"
    split = data.get("eval_split", "test") if source == data.get("source") else "test"
    rows = f", {n} rows" if isinstance(n, int) else ""
    return f"{source}, {split} split{rows}"


def _task_source(task: str) -> str | None:
    if task == "vqa" or task.startswith("lm_eval:"):
        return None  # the run's own data / lm-evaluation-harness's dataset
    from polmctl.evals import EVAL_TASKS

    return EVAL_TASKS[task][0] if task in EVAL_TASKS else None


def weights_on_disk(final: Path) -> tuple[int | None, bool]:
    """(bytes of the weight files in final/, whether final/ is a peft adapter without its base); (None, False)
    without final/. An adapter kept over its quantized base (recipe=quantize method.adapter=keep, in
    final/base/) counts both: that is the model."""
    if not final.is_dir():
        return None, False
    size = sum(p.stat().st_size for p in final.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if (final / "base").is_dir():
        return size + weights_on_disk(final / "base")[0], False
    return size, (final / "adapter_config.json").is_file()


def _inputs(config: dict) -> list[str]:
    """The models a stage started from: its model, or a merge's method.models."""
    method = config.get("method") or {}
    models = method.get("models") if method.get("name") == "merge" else None
    if isinstance(models, list) and models:
        return [str(m) for m in models]
    model = (config.get("model") or {}).get("name_or_path")
    return [str(model)] if model else []


# What a later stage may start from: the stage's run dir (its final/), final/, or adapter/ (a merged
# LoRA run's adapter alone: the survey's quantize stage keeps it over a 4-bit base)
STAGE_OUTPUTS = ("", "final", "adapter")


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, ValueError):
        return False


def stage_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of the pipeline run at ``run_dir`` (see the module docstring)."""
    summary = read_json(run_dir / "summary.json")
    if not is_pipeline(summary):
        raise CommandError(f"{run_dir} is not a pipeline run (its summary.json lists no stages)")
    dirs = stage_dirs(run_dir, summary)
    done: list[tuple[str, Path, dict]] = []  # (label, dir, after results) of the stages so far
    rows = []
    for i, (entry, sdir) in enumerate(zip(summary["stages"], dirs), 1):
        label = f"{i}. {entry.get('name', sdir.name)}"
        own = read_json(sdir / "summary.json") or {}
        config = read_yaml(sdir / ".hydra" / "config.yaml")
        before, after, sources = eval_results(own)
        inputs = _inputs(config)
        size, adapter = weights_on_disk(sdir / "final")
        common = {
            "stage": label,
            "name": entry.get("name"),
            "paradigm": (config.get("recipe") or {}).get("paradigm") or _paradigm(entry.get("recipe")),
            "recipe": entry.get("recipe") or (config.get("recipe") or {}).get("name") or "?",
            "status": entry.get("status") or own.get("status") or "?",
            "train_time_s": next((own[k] for k in WORK_TIME_KEYS if _number(own.get(k))), None),
            "wall_time_s": own.get("wall_time_s") if _number(own.get("wall_time_s")) else entry.get("wall_time_s"),
            "peak_memory_mb": own.get("peak_memory_mb") if _number(own.get("peak_memory_mb")) else None,
            "weights_bytes": size,
            "adapter": adapter,
            "params": (own.get("params") or {}).get("after") if isinstance(own.get("params"), dict) else None,
            "run_dir": sdir.name,
            "error": entry.get("error"),
        }
        tasks = list(dict.fromkeys([*after, *before]))
        for task in tasks or [None]:
            row = {**common, "task": task, "metric": None, "held_out": None, "before": None, "after": None}
            row["before_from"] = None
            if task is not None:
                results = after.get(task) or before.get(task) or {}
                metric = headline_metric(results)
                row.update(task=task, metric=metric, held_out=held_out(task, config, results.get("n")))
                row["after"] = (after.get(task) or {}).get(metric)
                row["before"], row["before_from"] = _before(
                    task, metric, results.get("n"), before, sources, inputs, done
                )
            rows.append(row)
        done.append((label, sdir, after))
    return rows


def _paradigm(recipe: Any) -> str:
    """A recipe's paradigm as its file says (for a stage that has not run: no .hydra/ of its own yet)."""
    path = RECIPES / f"{recipe}.yaml"
    return str((read_yaml(path).get("recipe") or {}).get("paradigm") or "?") if isinstance(recipe, str) else "?"


def _before(task, metric, n, before, sources, inputs, done) -> tuple[Any, str | None]:
    """The "before" of ``task``: measured by the stage (a merge: its best source), else the best "after" of
    the earlier stages it started from, on as many held-out rows."""
    if _number((before.get(task) or {}).get(metric)):
        return before[task][metric], "measured"
    if sources:
        found = [
            (r[task][metric], _label(path, done))
            for path, r in sources.items()
            if _number((r.get(task) or {}).get(metric))
        ]
    else:
        found = [
            (after[task][metric], f"from {label}")
            for label, sdir, after in done
            if _number((after.get(task) or {}).get(metric))
            and after[task].get("n") == n
            and any(_same_path(m, sdir / out) for m in inputs for out in STAGE_OUTPUTS)
        ]
    if not found:
        return None, None
    best = found[0]
    for value, where in found[1:]:
        if better(metric, value, best[0]):
            best = (value, where)
    return best


def _label(path: str, done: list[tuple[str, Path, dict]]) -> str:
    """A merge source: the earlier stage it is the output of, else its path."""
    for label, sdir, _ in done:
        if _same_path(path, sdir) or _same_path(path, sdir / "final"):
            return f"best source, {label}"
    return f"best source, {path}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- display ------------------------------------------------------------------------------------


def fmt_size(row: dict) -> str:
    size = row.get("weights_bytes")
    if size is None:
        return "-"
    text = _bytes(size) + (" (adapter)" if row.get("adapter") else "")
    return f"{text}, {row['params']:,} params" if isinstance(row.get("params"), int) else text


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def fmt_change(row: dict) -> str:
    before, after = row.get("before"), row.get("after")
    if row.get("metric") is None:
        return "-"
    text = f"{fmt_number(before)} -> {fmt_number(after)}"
    if _number(before) and _number(after):
        text += f" ({after - before:+.3g})"
    if row.get("before_from") not in (None, "measured"):
        text += f" [before: {row['before_from']}]"
    return text


def display_cells(row: dict) -> list[str]:
    """The row's cells under ``COLUMNS``, as text."""
    metric = f"{row['task']} {row['metric']} on {row['held_out']}" if row.get("metric") else "-"
    memory = row.get("peak_memory_mb")
    return [
        row["stage"] + ("" if row["status"] == "completed" else f" ({row['status']})"),
        row["paradigm"],
        row["recipe"],
        metric,
        fmt_change(row),
        fmt_duration(row.get("train_time_s")),
        fmt_duration(row.get("wall_time_s")),
        f"{memory:,.0f} MB" if _number(memory) else "-",
        fmt_size(row),
    ]


def markdown(rows: list[dict], title: str, intro: str = "") -> str:
    """A markdown table of the rows under a title (and ``intro``), with a note on its columns."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", *([intro, ""] if intro else [])]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in display_cells(r)) + " |" for r in rows]
    lines += [
        "",
        "before -> after: the stage's held-out metric before and after it; [before: ...] names the earlier stage "
        "whose result it is when the stage did not measure it itself. Peak memory on CPU is the process's peak "
        "resident memory so far: stages run in one process, so a stage shows at least the peak of those before it.",
    ]
    return "\n".join(lines) + "\n"
