"""What ``polmctl data inspect`` reports: rows, format, columns, token lengths as training renders
them, exact and near duplicates, and a PNG of the length histograms.

    polmctl data inspect builtin:instructions
    polmctl data inspect rows.jsonl --model builtin:tiny --near-dedup 0.7 --plot lengths.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polmctl.curation import dedup
from polmctl.curation.rows import row_text, token_lengths
from polmctl.errors import CommandError


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def length_stats(values: list[int]) -> dict[str, float]:
    s = sorted(values)
    return {
        "min": s[0],
        "mean": sum(s) / len(s),
        "p50": _percentile(s, 0.5),
        "p90": _percentile(s, 0.9),
        "p99": _percentile(s, 0.99),
        "max": s[-1],
    }


def inspect_rows(
    rows: list[dict], fmt: str, tokenizer, *, source: str, near_threshold: float | None = 0.8, max_length: int = 512
) -> dict[str, Any]:
    """The statistics of ``rows`` (format ``fmt``); lengths need ``tokenizer``."""
    prompt, answer = [], []
    for i, row in enumerate(rows):
        p, a = token_lengths(row, fmt, tokenizer, f"{source}: row {i}")
        prompt.append(p)
        answer.append(a)
    total = [p + a for p, a in zip(prompt, answer)]
    texts = [row_text(r, fmt) for r in rows]
    exact = dedup.exact_duplicates(texts)
    groups: dict[int, list[int]] = {}
    for row, first in exact.items():
        groups.setdefault(first, [first]).append(row)
    stats: dict[str, Any] = {
        "source": source,
        "rows": len(rows),
        "format": fmt,
        "columns": sorted({c for r in rows for c in r}),
        "tokens": {"total": length_stats(total), "answer": length_stats(answer)},
        "total_tokens": sum(total),
        "answer_tokens": sum(answer),
        "over_max_length": {"max_length": max_length, "rows": sum(t > max_length for t in total)},
        "exact_duplicates": {"rows": len(exact), "groups": sorted(groups.values())[:20]},
        "lengths": {"prompt": prompt, "answer": answer},
    }
    if any(prompt):
        stats["tokens"]["prompt"] = length_stats(prompt)
    if near_threshold is not None:
        near = dedup.near_duplicates(texts, near_threshold, skip=set(exact))
        stats["near_duplicates"] = {
            "threshold": near_threshold,
            "rows": len(near),
            "pairs": [[n.of, row, round(n.similarity, 3)] for row, n in sorted(near.items())][:20],
        }
    return stats


def plot_lengths(stats: dict[str, Any], path: Path) -> Path:
    """Histograms of the total and answer token lengths, one PNG."""
    try:
        from matplotlib.figure import Figure  # a bare Figure renders with Agg: no GUI backend
    except ImportError:
        raise CommandError(
            "the length plot needs matplotlib: pip install 'polmctl[plot]' (or pass --no-plot)"
        ) from None
    prompt, answer = stats["lengths"]["prompt"], stats["lengths"]["answer"]
    total = [p + a for p, a in zip(prompt, answer)]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    axes = fig.subplots(1, 2)
    for ax, values, label in ((axes[0], total, "prompt + answer"), (axes[1], answer, "answer")):
        ax.hist(values, bins=min(50, max(5, len(set(values)))), color="#4c72b0")
        ax.set_xlabel(f"{label} tokens")
        ax.set_ylabel("rows")
        ax.axvline(stats["tokens"]["total" if ax is axes[0] else "answer"]["p50"], color="k", ls="--", lw=1)
    limit = stats["over_max_length"]["max_length"]
    if limit <= max(total):
        axes[0].axvline(limit, color="#c44e52", lw=1, label=f"max_length {limit}")
        axes[0].legend()
    fig.suptitle(f"{stats['source']}: {stats['rows']} rows ({stats['format']}); dashed: median")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    except OSError as err:
        raise CommandError(f"cannot write the plot to {path} ({err.strerror or err}); choose another --plot") from None
    return path
