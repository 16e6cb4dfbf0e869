"""``polmctl report``: one self-contained HTML page for a run dir.

    polmctl report outputs/lora/2026-11-24/10-00-00               # writes <run dir>/report.html
    polmctl report outputs/compress/2026-11-25/10-00-00 --out compress.html --samples 12

The page holds what the run wrote: its numbers (wall time, peak memory, steps, losses, what its
runner measured), the eval results before and after (eval/results-*.json via summary.json), the
training curves from metrics.jsonl as PNG images inlined as data URIs, a sample of the generated
answers before and after side by side (eval/<task>-<tag>.jsonl: the same held-out prompts), the
full summary.json and the composed config (.hydra/), collapsed. A pipeline run dir (its summary.json
lists stages) gets the table of its stages (polmctl/commands/stage_table.py) and one section per
stage. Nothing on the page is fetched: no scripts, styles, fonts or images from anywhere else.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polmctl.commands.report_plots import Curve, curves
from polmctl.commands.runs import fmt_duration, fmt_number, is_run_dir, run_status
from polmctl.commands.stage_table import (
    COLUMNS,
    display_cells,
    eval_results,
    is_pipeline,
    read_json,
    read_yaml,
    stage_dirs,
    stage_rows,
)
from polmctl.errors import CommandError

TEMPLATES = Path(__file__).parent / "templates"
TAG_ORDER = ("before", "source", "after", "merged", "")  # columns of the generations table, in this order
MAX_TEXT = 400  # characters of a prompt or completion shown


@dataclass
class Generations:
    task: str
    tags: list[str]
    totals: dict[str, str]  # tag -> "3/8 correct"
    rows: list[dict[str, Any]]  # {"prompt", "answer", "cells": [{"text", "correct"} per tag]}


@dataclass
class Section:
    anchor: str
    title: str
    run_dir: str
    status: str
    facts: list[tuple[str, str]]
    eval_columns: list[str]
    eval_rows: list[list[str]]
    curves: list[Curve]
    generations: list[Generations]
    summary_json: str | None
    config_yaml: str | None
    overrides: list[str]
    error: str | None = None
    stage_columns: list[str] = field(default_factory=list)
    stage_rows: list[dict[str, Any]] = field(default_factory=list)  # {"anchor", "cells"}
    stages: list["Section"] = field(default_factory=list)


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise CommandError(f"{run_dir}: no such directory; give a run dir (it holds summary.json or .hydra/)")
    if not is_run_dir(run_dir):
        raise CommandError(
            f"{run_dir} is not a run dir (no summary.json, metrics.jsonl or .hydra/config.yaml in it); "
            "polmctl runs lists the run dirs under ./outputs"
        )


def build_section(run_dir: Path, samples: int, anchor: str = "run", title: str | None = None) -> Section:
    """What the page shows of one run dir (a pipeline's stages included)."""
    summary = read_json(run_dir / "summary.json")
    config_path, overrides_path = run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "overrides.yaml"
    section = Section(
        anchor=anchor,
        title=title or _title(run_dir, summary),
        run_dir=str(run_dir),
        status=run_status(summary, run_dir),
        facts=facts(summary),
        eval_columns=[],
        eval_rows=[],
        curves=curves(run_dir),
        generations=generations(run_dir, samples),
        summary_json=json.dumps(summary, indent=2) if summary is not None else None,
        config_yaml=_read_text(config_path),
        overrides=_overrides(overrides_path),
        error=_read_text(run_dir / "error.log"),
    )
    section.eval_columns, section.eval_rows = eval_table(summary)
    if is_pipeline(summary):
        rows = stage_rows(run_dir)
        section.stage_columns = list(COLUMNS)
        section.stages = [
            _stage_section(i, e, d, samples)
            for i, (e, d) in enumerate(zip(summary["stages"], stage_dirs(run_dir, summary)), 1)
        ]
        anchors = {
            f"{i}. {e.get('name')}": s.anchor for i, (e, s) in enumerate(zip(summary["stages"], section.stages), 1)
        }
        section.stage_rows = [{"anchor": anchors.get(r["stage"]), "cells": display_cells(r)} for r in rows]
    return section


def _stage_section(index: int, entry: dict, stage_dir: Path, samples: int) -> Section:
    anchor, title = f"stage-{index}-{entry.get('name')}", f"Stage {index}: {entry.get('name')} ({entry.get('recipe')})"
    if stage_dir.is_dir():
        return build_section(stage_dir, samples, anchor, title)
    status = str(entry.get("status") or "pending")
    what = "not run yet" if status == "pending" else "its run dir is missing"
    return Section(
        anchor, title, str(stage_dir), status, [("status", f"{status}: {what}")], [], [], [], [], None, None, []
    )


def _title(run_dir: Path, summary: dict | None) -> str:
    recipe = (summary or {}).get("recipe") or _config_value(run_dir, "recipe") or "run"
    return f"{'pipeline ' if is_pipeline(summary) else ''}{recipe}"


def _config_value(run_dir: Path, key: str) -> str | None:
    value = read_yaml(run_dir / ".hydra" / "config.yaml").get(key) or {}
    return value.get("name") if isinstance(value, dict) else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _overrides(path: Path) -> list[str]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


# -- the numbers -------------------------------------------------------------------------------


def facts(summary: dict | None) -> list[tuple[str, str]]:
    """(label, value) of the run's headline numbers, those its summary.json has."""
    if summary is None:
        return [("summary.json", "none yet: the run failed before writing it, was killed, or is still running")]
    s = summary
    out: list[tuple[str, str]] = []

    def add(label: str, value: Any) -> None:
        if value is not None and value != "-":
            out.append((label, value if isinstance(value, str) else fmt_number(value)))

    add("status", s.get("status"))
    add("model", s.get("model"))
    if is_pipeline(s):
        add("stages", " -> ".join(f"{e.get('name')} ({e.get('recipe')})" for e in s["stages"]))
        add("skipped (finished earlier)", ", ".join(s.get("skipped") or []) or None)
        add("failed stage", s.get("failed_stage"))
    add("steps", s.get("steps"))
    if _num(s.get("first_loss")) and _num(s.get("final_loss")):
        add("loss first -> final", f"{fmt_number(s['first_loss'])} -> {fmt_number(s['final_loss'])}")
    for key, label in (
        ("train_time_s", "training time"),
        ("prune_time_s", "pruning time"),
        ("quantize_time_s", "quantization time"),
        ("merge_time_s", "merge time"),
        ("wall_time_s", "wall time"),
    ):
        if _num(s.get(key)):
            add(label, fmt_duration(s[key]))
    if _num(s.get("peak_memory_mb")):
        add("peak memory", f"{s['peak_memory_mb']:,.0f} MB")
    add("tokens/s", _before_after(s.get("tokens_per_s")))
    if _num(s.get("trainable_params")) and _num(s.get("total_params")):
        add("trainable parameters", f"{s['trainable_params']:,} of {s['total_params']:,}")
    add("scheme", s.get("quantization") or s.get("scheme"))
    add("size on disk", _before_after(s.get("size_on_disk_bytes"), scale=2**20, unit=" MB"))
    add("parameter memory", _before_after(s.get("param_memory_bytes"), scale=2**20, unit=" MB"))
    add("pruning criterion", s.get("criterion"))
    add("sparsity", (s.get("sparsity") or {}).get("overall") if isinstance(s.get("sparsity"), dict) else None)
    add("layers", _before_after(s.get("layers")))
    add("parameters", _before_after(s.get("params")))
    cal = s.get("calibration")
    if isinstance(cal, dict) and _num(cal.get("perplexity_before")):
        add(
            "calibration perplexity",
            f"{fmt_number(cal['perplexity_before'])} -> {fmt_number(cal.get('perplexity_after'))}",
        )
    add("merge", s.get("merge"))
    if isinstance(s.get("models"), list):
        add("merged models", ", ".join(map(str, s["models"])))
    return out


def _before_after(value: Any, scale: float = 1, unit: str = "") -> str | None:
    """A number as it is; a {before, after[, ratio]} dict as ``before -> after (ratio x)``."""
    if _num(value):
        return fmt_number(value)
    if not isinstance(value, dict) or not _num(value.get("before")) or not _num(value.get("after")):
        return None

    def show(x: float) -> str:
        return f"{x / scale:,.1f}{unit}" if scale != 1 else f"{fmt_number(x)}{unit}"

    text = f"{show(value['before'])} -> {show(value['after'])}"
    return text + (f" ({value['ratio']:.3g}x)" if _num(value.get("ratio")) else "")


def eval_table(summary: dict | None) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of the run's eval results: each task/metric before, after and the change; a
    merge's sources and merged model."""
    before, after, sources = eval_results(summary)
    if not (before or after or sources):
        return [], []
    merged = set((summary or {}).get("eval") or {}) <= {"merged", "sources"}
    if merged:
        names = list(sources)
        columns = [
            "task / metric",
            *(f"source {i}: {Path(p).parent.name}/{Path(p).name}" for i, p in enumerate(names, 1)),
            "merged",
        ]
        tables = [sources[n] for n in names] + [after]
    else:
        columns = ["task / metric", "before", "after", "change"]
        tables = [before, after]
    rows = []
    for task in dict.fromkeys(k for t in tables for k in t):
        metrics = dict.fromkeys(m for t in tables for m in (t.get(task) or {}))
        for metric in metrics:
            if metric == "n":
                continue
            values = [(t.get(task) or {}).get(metric) for t in tables]
            row = [f"{task} / {metric}", *(fmt_number(v) for v in values)]
            if not merged:
                old, new = values
                row.append(f"{new - old:+.4g}" if _num(old) and _num(new) else "-")
            rows.append(row)
        counts = [(t.get(task) or {}).get("n") for t in tables]
        if any(_num(c) for c in counts):
            rows.append([f"{task} / held-out rows", *(fmt_number(c) for c in counts), *([] if merged else [""])])
    return columns, rows


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the generations ---------------------------------------------------------------------------


def _tag_rank(tag: str) -> tuple[int, str]:
    base = "source" if tag.startswith("source-") else tag
    return (TAG_ORDER.index(base) if base in TAG_ORDER else len(TAG_ORDER), tag)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in (_read_text(path) or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def generations(run_dir: Path, samples: int) -> list[Generations]:
    """Per eval task, the first ``samples`` held-out prompts with each evaluation's answer side by side."""
    files: dict[str, dict[str, Path]] = {}
    for path in sorted((run_dir / "eval").glob("*.jsonl")):
        match = re.fullmatch(r"(.+?)(?:-(before|after|merged|source-\d+))?", path.stem)
        task, tag = match.group(1), match.group(2) or ""
        files.setdefault(task, {})[tag] = path
    out = []
    for task, by_tag in files.items():
        tags = sorted(by_tag, key=_tag_rank)
        answers = {tag: _read_jsonl(by_tag[tag]) for tag in tags}
        answers = {t: rows for t, rows in answers.items() if rows and "prompt" in rows[0]}
        if not answers or samples <= 0:
            continue
        tags = list(answers)
        first = answers[tags[0]]
        rows = []
        for i, row in enumerate(first[:samples]):
            cells = []
            for tag in tags:
                other = _matching(answers[tag], i, row.get("prompt"))
                cells.append(
                    {"text": _cut(other.get("completion")), "correct": other.get("correct")} if other else {"text": "-"}
                )
            rows.append({"prompt": _cut(row.get("prompt")), "answer": _cut(row.get("answer")), "cells": cells})
        totals = {}
        for tag, rows_of_tag in answers.items():
            marks = [r.get("correct") for r in rows_of_tag if isinstance(r.get("correct"), bool)]
            totals[tag] = f"{sum(marks)}/{len(marks)} correct" if marks else f"{len(rows_of_tag)} answers"
        out.append(
            Generations(task, [t or "answer" for t in tags], {t or "answer": v for t, v in totals.items()}, rows)
        )
    return out


def _matching(rows: list[dict], index: int, prompt: Any) -> dict | None:
    """The answer to the same held-out row: the same index when its prompt agrees, else the first with that prompt."""
    if index < len(rows) and rows[index].get("prompt") == prompt:
        return rows[index]
    return next((r for r in rows if r.get("prompt") == prompt), None)


def _cut(value: Any) -> str:
    """A prompt, answer or completion as shown: surrounding whitespace dropped (said so when that is all there
    is), runs of blank lines made one, at most MAX_TEXT characters."""
    raw = "" if value is None else str(value)
    text = re.sub(r"\n\s*\n+", "\n\n", raw.strip())
    if not text:
        return f"(only whitespace: {len(raw)} characters)" if raw else "(empty)"
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + " [...]"


# -- the page ----------------------------------------------------------------------------------


def render_page(section: Section, heading: str) -> str:
    try:
        import jinja2
    except ImportError:
        raise CommandError(
            "the report page is rendered with jinja2, which is not installed: pip install jinja2"
        ) from None
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    try:
        version = importlib.metadata.version("polmctl")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return env.get_template("report.html.j2").render(
        heading=heading,
        root=section,
        generated=dt.datetime.now().isoformat(timespec="seconds"),
        version=version,
    )


def report_path(run_dir: Path, out: Path | None) -> Path:
    if out is None:
        return run_dir / "report.html"
    return out / "report.html" if out.is_dir() else out


def write_report(run_dir: Path, out: Path | None = None, samples: int = 8, heading: str | None = None) -> Path:
    """Write the page of ``run_dir`` (default ``<run dir>/report.html``) and return its path."""
    check_run_dir(run_dir)
    if samples < 0:
        raise CommandError(f"--samples {samples}: give a number of generations to show, 0 or more")
    section = build_section(run_dir, samples)
    path = report_path(run_dir, out)
    html = render_page(section, heading or f"polmctl report: {section.title}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html)
    except OSError as err:
        raise CommandError(f"cannot write the report to {path} ({err.strerror or err}); choose another --out") from None
    return path
