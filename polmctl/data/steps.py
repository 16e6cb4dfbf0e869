"""Step-labelled rows and Step-DPO pairs -> token ids.

    polmctl run recipe=prm data.source=steps.jsonl "method.step_separator='\n\n'"
    polmctl run recipe=step_dpo data.source=step_pairs.jsonl

Stepwise supervision (TRL's PRM format, Math-Shepherd as TRL converts it):
``{"prompt", "completions": [step, ...], "labels": [bool, ...]}``. The prompt is rendered by
``format_prompt`` (as in training, evaluation and the prm reward alike); each step is tokenized on
its own and followed by the separator's tokens, and the step's label (1: right so far, 0: wrong)
sits on the separator's last token; every other token is ``IGNORE_INDEX``. This is TRL
``PRMTrainer.tokenize_row``, except that TRL puts BOS before the raw prompt where polmctl
renders it with the chat template.

Step-DPO pairs: ``{"prompt", "prefix", "chosen", "rejected"}`` (``initial_reason_steps``, the
name in the Math-Step-DPO-10K data, is read as ``prefix``). The prefix (the correct steps so far)
continues the assistant's turn after the rendered prompt and is context, like the prompt;
chosen and rejected are one step each, without an end-of-turn marker (a step is not the end of
the answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from polmctl.data.formats import format_prompt
from polmctl.data.preference import PreferenceStats
from polmctl.errors import DataError
from polmctl.losses import IGNORE_INDEX

STEP_COLUMNS = ("prompt", "completions", "labels")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
PREFIX_COLUMNS = ("prefix", "initial_reason_steps")


def separator_ids(tokenizer, separator: str, key: str) -> list[int]:
    """The token ids of the step separator; an error naming ``key`` if it has none."""
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    if not ids:
        raise DataError(f"{key}={separator!r} gives no token; use a separator such as '\\n'")
    return ids


def encode_steps(prompt: Any, steps: list[str], tokenizer, sep_ids: list[int], where: str = "prompt"):
    """``(ids, ends)``: the rendered prompt, then each step followed by the separator, and the
    position of each step's label token (its separator's last token)."""
    ids = tokenizer(format_prompt(prompt, tokenizer, where=where), add_special_tokens=False)["input_ids"]
    ends = []
    for step_ids in tokenizer(list(steps), add_special_tokens=False)["input_ids"] if steps else []:
        ids += step_ids + sep_ids
        ends.append(len(ids) - 1)
    return ids, ends


@dataclass
class StepStats:
    rows: int = 0
    kept: int = 0
    steps: int = 0  # labelled steps kept
    correct: int = 0  # of which labelled true
    truncated: int = 0
    empty: int = 0
    too_long: int = 0
    first_skipped_index: int | None = None

    def skip(self, index: int, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if self.first_skipped_index is None:
            self.first_skipped_index = index

    def summary(self) -> str:
        true = self.correct / max(self.steps, 1)
        text = f"{self.kept}/{self.rows} rows, {self.steps} labelled steps ({true:.0%} true)"
        if self.truncated:
            text += f", {self.truncated} rows truncated (their late steps unlabelled)"
        skipped = {k: getattr(self, k) for k in ("empty", "too_long") if getattr(self, k)}
        if skipped:
            reasons = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items())
            text += f", skipped {reasons} (first: row {self.first_skipped_index})"
        return text


def _check_step_row(row: Any, where: str) -> tuple[list[str], list[int]]:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, not a row with named columns")
    missing = [c for c in STEP_COLUMNS if c not in row]
    if missing:
        raise DataError(
            f"{where}: column '{missing[0]}' is missing; step-labelled rows are "
            "{prompt, completions: [step, ...], labels: [true|false, ...]} (TRL's PRM format)"
        )
    steps, labels = row["completions"], row["labels"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise DataError(f"{where}, column 'completions': expected a list of step texts, got {steps!r:.80}")
    if not isinstance(labels, list) or not all(isinstance(v, bool) or v in (0, 1) for v in labels):
        raise DataError(f"{where}, column 'labels': expected a list of true/false, got {labels!r:.80}")
    if len(steps) != len(labels):
        raise DataError(f"{where}: {len(steps)} steps but {len(labels)} labels; give one label per step")
    return steps, [int(v) for v in labels]


def encode_step_rows(
    rows: list[dict],
    tokenizer,
    *,
    source: str,
    separator: str,
    max_length: int = 512,
    overlong: str = "truncate",
    bad_rows: str = "skip",
    last_step_only: bool = False,
    separator_key: str = "method.step_separator",
) -> tuple[list[dict], StepStats]:
    """Encoded rows {"input_ids", "labels", "row"} (labels per token: 0 / 1 on each step's label
    token, IGNORE_INDEX elsewhere; "row": the row's index in ``rows``). ``last_step_only`` keeps
    only the last step's label (TRL's ``train_on_last_step_only``). A row longer than
    ``max_length`` is cut from the right (``overlong=truncate``: its late steps lose their
    labels, and a row left with none is skipped), skipped (``drop``) or an error."""
    if not rows:
        raise DataError(f"{source}: no rows to encode")
    sep_ids = separator_ids(tokenizer, separator, separator_key)
    stats, examples = StepStats(rows=len(rows)), []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        steps, labels = _check_step_row(row, where)
        if not steps:
            if bad_rows == "error":
                raise DataError(f"{where}: no steps in 'completions'; fill it or remove the row")
            stats.skip(i, "empty")
            continue
        ids, ends = encode_steps(row["prompt"], steps, tokenizer, sep_ids, where=f"{where}, column 'prompt'")
        if last_step_only:
            ends, labels = ends[-1:], labels[-1:]
        if len(ids) > max_length:
            if overlong == "error":
                raise DataError(
                    f"{where} has {len(ids)} tokens, more than data.max_length={max_length}; raise it or "
                    "set data.overlong=truncate|drop"
                )
            kept = [(e, v) for e, v in zip(ends, labels) if e < max_length]
            if overlong == "drop" or not kept:
                stats.skip(i, "too_long")
                continue
            ids, ends, labels = ids[:max_length], [e for e, _ in kept], [v for _, v in kept]
            stats.truncated += 1
        token_labels = [IGNORE_INDEX] * len(ids)
        for end, label in zip(ends, labels):
            token_labels[end] = label
        examples.append({"input_ids": ids, "labels": token_labels, "row": i})
        stats.kept += 1
        stats.steps += len(labels)
        stats.correct += sum(labels)
    if not examples:
        raise DataError(f"{source}: no usable step-labelled row ({stats.summary()})")
    return examples, stats


def _pair_texts(row: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, not a row with named columns")
    missing = [c for c in PAIR_COLUMNS if c not in row]
    prefix_column = next((c for c in PREFIX_COLUMNS if c in row), None)
    if missing or prefix_column is None:
        column = missing[0] if missing else "prefix"
        raise DataError(
            f"{where}: column '{column}' is missing; Step-DPO rows are {{prompt, prefix, chosen, rejected}}: "
            "the correct steps so far ('' for none), the correct next step and the first wrong one "
            "(pairs of whole answers train with recipe=dpo)"
        )
    texts = (row[prefix_column], row["chosen"], row["rejected"])
    for column, text in zip((prefix_column, "chosen", "rejected"), texts):
        if not isinstance(text, str):
            raise DataError(f"{where}, column '{column}': expected text, got {type(text).__name__} {text!r:.60}")
    return texts


def encode_step_pairs(
    rows: list[dict],
    tokenizer,
    *,
    source: str,
    max_length: int = 512,
    overlong: str = "truncate",
    bad_rows: str = "skip",
) -> tuple[list[dict], PreferenceStats]:
    """Encoded Step-DPO pairs {"prompt_ids", "chosen_ids", "rejected_ids"}, the shape of the DPO
    family's examples: ``prompt_ids`` are the rendered prompt and then the prefix, so the loss
    and log-probs cover the two differing steps only. Empty or identical steps, and prompts
    that leave no room within ``max_length``, are skipped (``bad_rows=skip``) or an error."""
    if not rows:
        raise DataError(f"{source}: no rows to encode")
    stats, examples = PreferenceStats(rows=len(rows)), []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        prefix, chosen, rejected = _pair_texts(row, where)
        reason = "empty" if not chosen.strip() or not rejected.strip() else "identical" if chosen == rejected else None
        if reason:
            if bad_rows == "error":
                raise DataError(f"{where}: chosen and rejected must be two different, non-empty steps")
            stats.skip(i, reason)
            continue
        text = format_prompt(row["prompt"], tokenizer, where=f"{where}, column 'prompt'")
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if prefix:
            prompt_ids += tokenizer(prefix, add_special_tokens=False)["input_ids"]
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = tokenizer([chosen, rejected], add_special_tokens=False)["input_ids"]
        cut = max(len(chosen_ids), len(rejected_ids)) > room
        if room < 1 or (cut and overlong != "truncate"):
            if overlong == "error" or (room < 1 and bad_rows == "error"):
                raise DataError(
                    f"{where}: prompt, prefix and step take more than data.max_length={max_length} tokens; "
                    "raise it or shorten the row"
                )
            stats.skip(i, "too_long")
            continue
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            stats.skip(i, "identical")  # different text, but identical once truncated
            continue
        stats.truncated += cut
        stats.kept += 1
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    if not examples:
        raise DataError(f"{source}: no usable Step-DPO pair ({stats.summary()})")
    return examples, stats
