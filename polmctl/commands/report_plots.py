"""A run's training curves (loss, accuracy, reward, KL, learning rate over steps) as PNG data URIs,
for the self-contained page of ``polmctl report`` and ``polmctl survey``.

    polmctl report outputs/lora/2026-11-24/10-00-00      # the page embeds these images

The curves come from ``metrics.jsonl``; a run that trains in parts (the vlm runner's stage1/ and
stage2/) is read part by part, each part's steps continuing the last one's. Each panel is a PNG
rendered with matplotlib's Agg backend (no display), base64-encoded into a ``data:image/png`` URI.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from polmctl.commands.compare import step_series
from polmctl.commands.runs import read_metrics_lines
from polmctl.errors import CommandError

# title -> which metrics.jsonl keys the panel draws; a key goes to the first panel that takes it.
PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: k == "loss"),
    ("accuracy", lambda k: "accurac" in k),
    ("reward", lambda k: k in ("reward", "score") or k.startswith(("reward/", "rewards/"))),
    ("KL", lambda k: k == "kl" or k.startswith(("kl_", "kl/"))),
    ("learning rate", lambda k: k == "lr"),
)
MAX_LINES = 6  # lines per panel: more would not read


@dataclass
class Curve:
    title: str
    keys: list[str]  # the metrics.jsonl keys drawn
    points: int  # data points drawn, over all lines
    data_uri: str  # data:image/png;base64,...


def metric_parts(run_dir: Path) -> dict[str, list[dict]]:
    """``{"": rows}`` of run_dir/metrics.jsonl, else ``{part: rows}`` of each subdir's that is not a run of
    its own (the vlm runner's stage1/, stage2/); empty when the run logged no steps."""
    rows = read_metrics_lines(run_dir / "metrics.jsonl")
    if rows:
        return {"": rows}
    parts = {}
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []:
        if not (sub / ".hydra").exists() and (sub_rows := read_metrics_lines(sub / "metrics.jsonl")):
            parts[sub.name] = sub_rows
    return parts


def _series(parts: dict[str, list[dict]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over every part, each part's steps after the previous part's last."""
    steps: list[float] = []
    values: list[float] = []
    offset = 0.0
    for rows in parts.values():
        s, v = step_series(rows, key)
        steps += [x + offset for x in s]
        values += v
        last = step_series(rows, "step")[1] or [len(rows)]
        offset += max(last)
    return steps, values


def _numeric_keys(parts: dict[str, list[dict]]) -> list[str]:
    keys: dict[str, None] = {}
    for rows in parts.values():
        for row in rows:
            keys.update((k, None) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return list(keys)


def curves(run_dir: Path) -> list[Curve]:
    """One PNG per panel that has data; none for a run that logged no steps (prune, quantize, merge)."""
    parts = metric_parts(run_dir)
    if not parts:
        return []
    figure = _matplotlib()
    taken: set[str] = set()
    out = []
    keys = _numeric_keys(parts)
    for title, wants in PANELS:
        mine = [k for k in keys if k not in taken and wants(k)][:MAX_LINES]
        taken.update(mine)
        lines = {k: _series(parts, k) for k in mine}
        lines = {k: v for k, v in lines.items() if v[0]}
        if lines:
            boundaries = _part_starts(parts) if len(parts) > 1 else []
            uri = _render(figure, title, lines, boundaries, list(parts))
            out.append(Curve(title, list(lines), sum(len(v[0]) for v in lines.values()), uri))
    return out


def _part_starts(parts: dict[str, list[dict]]) -> list[float]:
    starts, offset = [], 0.0
    for rows in list(parts.values())[:-1]:
        offset += max(step_series(rows, "step")[1] or [len(rows)])
        starts.append(offset + 0.5)
    return starts


def _matplotlib():
    try:
        from matplotlib.figure import Figure  # a bare Figure renders with Agg: no GUI backend, no global state
    except ImportError:
        raise CommandError(
            "the report's plots need matplotlib, which is not installed: "
            "pip install 'polmctl[plot]' (or pip install matplotlib)"
        ) from None
    return Figure


def _render(figure, title: str, lines: dict, boundaries: list[float], part_names: list[str]) -> str:
    from matplotlib.ticker import MaxNLocator

    fig = figure(figsize=(4.6, 2.6), layout="constrained")
    ax = fig.subplots()
    for key, (steps, values) in lines.items():
        ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None, linewidth=1.4)
    for x in boundaries:
        ax.axvline(x, color="0.6", linestyle=":", linewidth=1)
    ax.set_title(title + (f" ({' | '.join(part_names)})" if boundaries else ""), fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if title == "learning rate":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if len(lines) > 1:
        ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
