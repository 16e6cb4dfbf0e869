r"""Before an online method loads its model: do the rows hold every column its rewards read, and
can ``math_answer`` check their reference answers?

    polmctl plan recipe=grpo data.source=competition_math.jsonl   # a missing column fails here, not FITS
    polmctl run recipe=grpo data.source=competition_math.jsonl    # ... and here, before the model loads

A reward reads the columns it declares: a ``columns`` attribute on the function, class or factory
wins; otherwise its required keyword parameters after (prompts, completions) (``math_answer``:
answer), for a class or an annotated factory those of its ``__call__``. ``math_answer`` also has
every row's reference answer parsed (polmctl/rollout/math_check.py): when most cannot be checked the
run stops, naming the first; when the rows carry a reference ``solution``, the checker scores it
against the row's own answer, and stops when it disagrees with most of them.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from polmctl.errors import DataError
from polmctl.rollout.math_check import uncheckable
from polmctl.rollout.rewards import (
    REWARD_FACTORIES,
    REWARD_FUNCTIONS,
    SPEC_KEYS,
    _as_dict,
    math_answer,
)
from polmctl.targets import resolve_target

PROMPT_COLUMNS = ("prompt", "messages", "completion")  # the prompt itself: rewards get the other columns
SOLUTION_COLUMNS = ("solution", "reference_solution")  # a worked solution whose final answer is the answer
SOLUTIONS_SCORED = 500  # the first rows' solutions are scored (math-verify takes milliseconds each)
MOST = 0.5  # more than this share of rows failing a check stops the run


def _call_of(obj: Any, built: bool) -> tuple[Callable | None, int]:
    """(the function a reward's calls run, how many leading parameters are not columns)."""
    if inspect.isclass(obj):
        return obj.__call__, 3  # self, prompts, completions
    if built:  # a factory: what its return annotation says it builds
        try:
            made = typing.get_type_hints(obj).get("return")
        except Exception:  # an annotation that names something unimportable: unknown, checked at the first call
            return None, 0
        return (made.__call__, 3) if inspect.isclass(made) else (None, 0)
    return obj, 2


def _required(fn: Callable, skip: int, bound: dict) -> tuple[str, ...]:
    try:
        params = list(inspect.signature(fn).parameters.values())[skip:]
    except (TypeError, ValueError):  # some C callables have no signature
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.default is p.empty and p.kind in kinds and p.name not in bound)


def reward_columns(spec: Any, key: str) -> tuple[str, tuple[str, ...] | None, Any]:
    """(name, the columns the reward reads or None when only building it would tell, the object
    the spec names) of a ``method.rewards`` entry, without building it (a reward model stays unloaded)."""
    spec = _as_dict({"name": spec} if isinstance(spec, str) else spec)
    build_args = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    if "_target_" in spec:
        obj = resolve_target(spec["_target_"], f"{key}._target_")
        name = spec.get("name") or str(spec["_target_"]).rsplit(".", 1)[-1]
        built = bool(build_args) and not inspect.isclass(obj)
    else:
        name = spec.get("name")
        obj = REWARD_FACTORIES.get(name) or REWARD_FUNCTIONS.get(name)
        if obj is None:
            return name, None, None  # an unknown name: resolve_reward says so when the run builds it
        built = name in REWARD_FACTORIES
    declared = getattr(obj, "columns", None)
    if declared is not None:
        return name, tuple(declared), obj
    fn, skip = _call_of(obj, built)
    return name, (None if fn is None else _required(fn, skip, spec.get("kwargs") or {})), obj


@dataclass
class RewardDataStats:
    """The prompts' stats, with what the reward checks found (one line)."""

    prompts: Any
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "; ".join([self.prompts.summary(), *self.notes])


def check_reward_data(
    rows: list[dict], specs: list, source: str, stats: Any, section: str = "method.rewards"
) -> RewardDataStats:
    """Refuse rows that lack a column a reward reads, or whose reference answers ``math_answer``
    cannot check; returns ``stats`` with what was checked."""
    report = RewardDataStats(stats)
    has = [c for c in rows[0] if c not in PROMPT_COLUMNS] if rows else []
    for i, spec in enumerate(specs):
        name, needed, obj = reward_columns(spec, f"{section}[{i}]")
        for column in needed or ():
            lacking = [j for j, row in enumerate(rows) if column not in row]
            if len(lacking) == len(rows):
                raise DataError(
                    f"{source}: reward {name!r} ({section}[{i}]) reads the column {column!r}, which the data "
                    f"lacks (columns: {', '.join(has) or 'none but the prompt'}); add it, or use another reward"
                )
            if lacking:
                raise DataError(
                    f"{source}: row {lacking[0]} lacks the column {column!r} that reward {name!r} reads "
                    f"({len(lacking)} of {len(rows)} rows lack it); fill it or remove those rows"
                )
        if obj is math_answer:
            report.notes += check_answers(rows, source)
    return report


def check_answers(rows: list[dict], source: str) -> list[str]:
    """Every row's reference ``answer`` parsed; a reference solution scored against it. Returns
    the summary notes; raises DataError when most rows fail either."""
    failures = [(i, row.get("answer"), why) for i, row in enumerate(rows) if (why := uncheckable(row.get("answer")))]
    if len(failures) > MOST * len(rows):
        i, value, why = failures[0]
        raise DataError(
            f"{source}: math_answer cannot check {len(failures)} of {len(rows)} reference answers (first: row "
            f"{i}, column 'answer' {value!r:.80} {why}); put each row's final answer alone in 'answer': a "
            r"number, LaTeX such as \frac{1}{2} or [1, 2), or a short text (GSM8K-style solutions: what follows ####)"
        )
    notes = [f"{len(rows) - len(failures)}/{len(rows)} reference answers checkable"]
    if failures:
        i, value, why = failures[0]
        notes[0] += f" (row {i}: {value!r:.40} {why}; such rows always score 0)"
    column = next((c for c in SOLUTION_COLUMNS if rows and c in rows[0]), None)
    if column is None:
        return notes
    failed = {i for i, _, _ in failures}
    scored = [(i, row) for i, row in enumerate(rows[:SOLUTIONS_SCORED]) if i not in failed and row.get(column)]
    if not scored:
        return notes
    scores = math_answer([""] * len(scored), [str(r[column]) for _, r in scored], [r["answer"] for _, r in scored])
    misses = [i for (i, _), s in zip(scored, scores) if s < 1]
    if len(misses) > MOST * len(scored):
        row = rows[misses[0]]
        raise DataError(
            f"{source}: math_answer scores {len(misses)} of {len(scored)} reference solutions (column {column!r}) "
            f"as wrong against their own answers (first: row {misses[0]}, answer {row['answer']!r:.40}, solution "
            f"ending {str(row[column])[-60:]!r}); the reward would score right answers 0: check that 'answer' "
            r"holds each solution's final answer (a solution ends with it, e.g. \boxed{...} or 'The answer is ...')"
        )
    notes.append(f"reference solutions ({column}) score {len(scored) - len(misses)}/{len(scored)}")
    return notes
