"""Screening a data set before SFT: filters in order, the rows kept, and why each other row went.

    polmctl data filter rows.jsonl --out kept.jsonl --dedup --near-dedup 0.8 --min-tokens 8 --max-tokens 1024
    polmctl data filter builtin:instructions --out kept.jsonl --model builtin:smollm2-135m --ifd-max 1 --ifd-top 0.5

Order: token length bounds, exact duplicates, near duplicates, IFD, reward-model score (the model
scores run only on the rows still in). A row is dropped by the first filter it fails; the report
names its index in the source and the reason. The kept rows are written as they were read, one JSON
object a line, so the file loads back in the same format.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from polmctl.curation import dedup
from polmctl.curation.rows import instruction_answer, row_text, token_lengths
from polmctl.errors import CommandError


@dataclass
class Filters:
    dedup: bool = False  # drop exact duplicates
    near_dedup: float | None = None  # drop near duplicates at this Jaccard similarity
    min_tokens: int | None = None  # prompt + answer tokens, as training renders them
    max_tokens: int | None = None
    min_answer_tokens: int | None = None
    max_answer_tokens: int | None = None
    ifd_max: float | None = None  # drop rows whose IFD is above this (the paper: 1)
    ifd_top: float | None = None  # then keep this fraction of the rest, highest IFD first
    min_reward: float | None = None  # drop rows a reward model scores below this

    def check(self) -> None:
        for name in ("min_tokens", "max_tokens", "min_answer_tokens", "max_answer_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise CommandError(f"--{name.replace('_', '-')}={value}: use a number of tokens >= 0")
        for low, high in (("min_tokens", "max_tokens"), ("min_answer_tokens", "max_answer_tokens")):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise CommandError(f"--{low.replace('_', '-')}={a} is above --{high.replace('_', '-')}={b}")
        if self.near_dedup is not None and not 0 < self.near_dedup <= 1:
            raise CommandError(f"--near-dedup={self.near_dedup}: a Jaccard similarity in (0, 1], e.g. 0.8")
        if self.ifd_max is not None and self.ifd_max <= 0:
            raise CommandError(f"--ifd-max={self.ifd_max}: use a positive IFD bound (the paper drops IFD > 1)")
        if self.ifd_top is not None and not 0 < self.ifd_top <= 1:
            raise CommandError(f"--ifd-top={self.ifd_top}: a fraction in (0, 1] of the rows to keep")

    @property
    def needs_ifd(self) -> bool:
        return self.ifd_max is not None or self.ifd_top is not None

    @property
    def needs_lengths(self) -> bool:
        bounds = (self.min_tokens, self.max_tokens, self.min_answer_tokens, self.max_answer_tokens)
        return any(b is not None for b in bounds)


@dataclass
class Drop:
    row: int
    reason: str  # length | exact_duplicate | near_duplicate | ifd | reward
    detail: str


@dataclass
class ScreenResult:
    rows: int
    kept: list[int]
    dropped: list[Drop] = field(default_factory=list)
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # per source row; None: not scored

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.dropped:
            out[d.reason] = out.get(d.reason, 0) + 1
        return out


def _length_reason(prompt: int, answer: int, f: Filters) -> str | None:
    total = prompt + answer
    if f.min_tokens is not None and total < f.min_tokens:
        return f"{total} tokens < --min-tokens {f.min_tokens}"
    if f.max_tokens is not None and total > f.max_tokens:
        return f"{total} tokens > --max-tokens {f.max_tokens}"
    if f.min_answer_tokens is not None and answer < f.min_answer_tokens:
        return f"{answer} answer tokens < --min-answer-tokens {f.min_answer_tokens}"
    if f.max_answer_tokens is not None and answer > f.max_answer_tokens:
        return f"{answer} answer tokens > --max-answer-tokens {f.max_answer_tokens}"
    return None


def screen(
    rows: list[dict],
    fmt: str,
    filters: Filters,
    *,
    source: str,
    tokenizer=None,
    ifd: Callable[[list[tuple[Any, str]]], list[Any]] | None = None,
    reward: Callable[[list[tuple[Any, str]]], list[float]] | None = None,
) -> ScreenResult:
    """Apply ``filters`` to ``rows`` (format ``fmt``). ``ifd`` and ``reward`` score (instruction,
    answer) pairs; they are called once, on the rows the earlier filters kept."""
    filters.check()
    result = ScreenResult(rows=len(rows), kept=[])
    alive = list(range(len(rows)))

    def drop(i: int, reason: str, detail: str) -> None:
        result.dropped.append(Drop(i, reason, detail))

    if filters.needs_lengths:
        if tokenizer is None:
            raise CommandError("length bounds count tokens: give --model (its tokenizer)")
        keep = []
        for i in alive:
            why = _length_reason(*token_lengths(rows[i], fmt, tokenizer, f"{source}: row {i}"), filters)
            if why:
                drop(i, "length", why)
            else:
                keep.append(i)
        alive = keep
    texts = [row_text(r, fmt) for r in rows]
    if filters.dedup:
        exact = dedup.exact_duplicates([texts[i] for i in alive])
        for local, first in exact.items():
            drop(alive[local], "exact_duplicate", f"same text as row {alive[first]}")
        alive = [i for k, i in enumerate(alive) if k not in exact]
    if filters.near_dedup is not None:
        near = dedup.near_duplicates([texts[i] for i in alive], filters.near_dedup)
        for local, match in near.items():
            drop(alive[local], "near_duplicate", f"{match.similarity:.2f} similar to row {alive[match.of]}")
        alive = [i for k, i in enumerate(alive) if k not in near]
    if filters.needs_ifd and alive:
        if ifd is None:
            raise CommandError("IFD filters need a causal LM to score with: give --model")
        pairs = [instruction_answer(rows[i], fmt, f"{source}: row {i}") for i in alive]
        scored = ifd(pairs)
        values = {i: s.ifd for i, s in zip(alive, scored)}
        result.scores["ifd"] = [values.get(i) for i in range(len(rows))]
        if filters.ifd_max is not None:
            for i in alive:
                if not values[i] <= filters.ifd_max:
                    drop(i, "ifd", f"IFD {values[i]:.3f} > --ifd-max {filters.ifd_max}")
            alive = [i for i in alive if values[i] <= filters.ifd_max]
        if filters.ifd_top is not None and alive:
            ranked = sorted(alive, key=lambda i: (-values[i], i))
            n = max(1, math.ceil(filters.ifd_top * len(ranked)))
            cut = values[ranked[n - 1]]
            for i in ranked[n:]:
                drop(i, "ifd", f"IFD {values[i]:.3f} below the top {filters.ifd_top:.0%} (>= {cut:.3f})")
            alive = sorted(ranked[:n])
    if filters.min_reward is not None and alive:
        if reward is None:
            raise CommandError("--min-reward needs --reward-model (a recipe=reward_model run dir)")
        pairs = [instruction_answer(rows[i], fmt, f"{source}: row {i}") for i in alive]
        values = dict(zip(alive, reward(pairs)))
        result.scores["reward"] = [values.get(i) for i in range(len(rows))]
        for i in alive:
            if values[i] < filters.min_reward:
                drop(i, "reward", f"reward {values[i]:.3f} < --min-reward {filters.min_reward}")
        alive = [i for i in alive if values[i] >= filters.min_reward]
    result.kept = alive
    result.dropped.sort(key=lambda d: d.row)
    return result


def write_jsonl(rows: list[dict], path: Path) -> None:
    """The rows as JSON lines, written to a temporary file and renamed into place."""
    if path.suffix.lower() != ".jsonl":
        raise CommandError(f"--out {path}: write the kept rows to a .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def report(result: ScreenResult, *, source: str, split: str, fmt: str, out: Path, filters: Filters) -> dict[str, Any]:
    return {
        "source": source,
        "split": split,
        "format": fmt,
        "out": str(out),
        "rows": result.rows,
        "kept": len(result.kept),
        "dropped_by_reason": result.counts(),
        "filters": asdict(filters),
        "dropped": [asdict(d) for d in result.dropped],
        "scores": result.scores,
    }
