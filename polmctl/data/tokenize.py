"""Rows -> token ids and labels, with the loss mask and the over-length policy.

    polmctl run recipe=sft data.max_length=1024 data.overlong=drop data.completion_only_loss=false

Each text segment is tokenized on its own (no special tokens added) and concatenated, so
the prompt's tokens are exactly ``tokenizer(format_prompt(p), add_special_tokens=False)``:
what evaluation and generation feed the model. Labels are aligned with input_ids (the
Hugging Face convention: -100 where nothing is trained; the shift happens in the loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from polmctl.console import console
from polmctl.data.formats import conversation_segments, detect_format, format_completion, format_prompt
from polmctl.errors import DataError
from polmctl.losses import IGNORE_INDEX

SUPERVISED = ("text", "messages", "prompt_completion")
OVERLONG = ("truncate", "drop", "error")
WARN_ABOVE = 0.05  # share of rows cut at data.max_length above which a run warns
WHOLE_SHARE = 0.95  # the share of rows the suggested data.max_length keeps whole


def length_to_keep(lengths: list[int], share: float = WHOLE_SHARE) -> int | None:
    """The smallest length that at least ``share`` of ``lengths`` fit in (None for no rows)."""
    if not lengths:
        return None
    return sorted(lengths)[max(0, math.ceil(share * len(lengths)) - 1)]


def warn_if_cut(
    cut: int, total: int, what: str, max_length: int, keep: int | None, dropped: bool = False
) -> str | None:
    """Print (and return) a warning when more than WARN_ABOVE of ``total`` are longer than ``max_length``
    (truncated: they lose their last tokens; ``dropped``: data.overlong=drop left them out)."""
    if not total or cut <= WARN_ABOVE * total:
        return None
    happened = (
        "are dropped (data.overlong=drop)"
        if dropped
        else "lose their last tokens, so training sees them without their endings"
    )
    text = (
        f"{cut} of {total} {what} ({100 * cut / total:.0f}%) are longer than data.max_length={max_length} and "
        f"{happened}; data.max_length={keep} keeps {WHOLE_SHARE:.0%} of rows whole"
    )
    console.print(f"[bold yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
    return text


@dataclass
class EncodeStats:
    """What ``encode_dataset`` did. ``trainable_tokens`` counts the tokens the loss is
    computed on: labelled tokens after a row's first (which nothing predicts)."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    first_dropped_index: int | None = None
    over_length: int = 0  # rows longer than max_length: truncated, or dropped by data.overlong=drop
    lengths: list[int] = field(default_factory=list, repr=False)  # every row's full length in tokens

    def whole_length(self, share: float = WHOLE_SHARE) -> int | None:
        """The data.max_length that keeps ``share`` of the rows whole."""
        return length_to_keep(self.lengths, share)

    def summary(self) -> str:
        text = f"{self.kept}/{self.rows} rows, {self.tokens} tokens ({self.trainable_tokens} trained)"
        if self.truncated:
            text += f", {self.truncated} truncated"
        if self.dropped:
            text += f", {self.dropped} dropped (first: row {self.first_dropped_index})"
        return text


def _text_column(row: dict, column: str, where: str) -> None:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value) or (isinstance(value, list) and not value):
        state = "is missing" if column not in row else "is empty"
        raise DataError(f"{where}, column '{column}' {state}; fill it or remove the row")
    if not isinstance(value, (str, list)):
        raise DataError(f"{where}, column '{column}' is a {type(value).__name__}; expected text or a message list")


def row_segments(row: dict, fmt: str, tokenizer, where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one row in format ``fmt``."""
    if fmt not in SUPERVISED:
        raise DataError(
            f"{where}: format {fmt!r} cannot be trained with a token-level loss; supervised formats: "
            f"{', '.join(SUPERVISED)} (preference rows need a preference objective)"
        )
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, not a row with named columns")
    if fmt == "text":
        _text_column(row, "text", where)
        if not isinstance(row["text"], str):
            raise DataError(f"{where}, column 'text' is a list; expected text")
        return [(row["text"] + (tokenizer.eos_token or ""), True)]
    if fmt == "messages":
        return conversation_segments(row.get("messages"), tokenizer, f"{where}, column 'messages'")
    for column in ("prompt", "completion"):
        _text_column(row, column, where)
    prompt, completion = row["prompt"], row["completion"]
    return [
        (format_prompt(prompt, tokenizer, where=f"{where}, column 'prompt'"), False),
        (format_completion(prompt, completion, tokenizer, where=f"{where}, column 'completion'"), True),
    ]


def _encode(
    row: dict, fmt: str, tokenizer, *, max_length: int, completion_only_loss: bool, overlong: str, where: str
) -> tuple[dict | None, str, int]:
    """(example or None, what happened: "kept" | "truncated" | "dropped", the row's full length)."""
    if overlong not in OVERLONG:
        raise DataError(f"data.overlong={overlong!r}; use one of {', '.join(OVERLONG)}")
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_len = None  # tokens before the first trained segment
    for text, trained in row_segments(row, fmt, tokenizer, where):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained and prompt_len is None:
            prompt_len = len(input_ids)
        input_ids += ids
        labels += ids if (trained or not completion_only_loss) else [IGNORE_INDEX] * len(ids)
    status, length = "kept", len(input_ids)
    if len(input_ids) > max_length:
        if overlong == "error":
            raise DataError(
                f"{where} has {len(input_ids)} tokens, more than data.max_length={max_length}; "
                "raise data.max_length or set data.overlong=truncate|drop"
            )
        if overlong == "drop" or (prompt_len or 0) >= max_length:
            return None, "dropped", length
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    # labels[0] is never predicted (nothing precedes it), so it does not count as trained.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None, "dropped", length
    return {"input_ids": input_ids, "labels": labels}, status, length


def encode_row(
    row: dict,
    fmt: str,
    tokenizer,
    *,
    max_length: int,
    completion_only_loss: bool = True,
    overlong: str = "truncate",
    where: str = "row",
) -> dict | None:
    """``{"input_ids", "labels"}`` for one row, or None if the over-length policy (or a
    row with nothing left to train) drops it. ``where`` prefixes error messages."""
    return _encode(
        row,
        fmt,
        tokenizer,
        max_length=max_length,
        completion_only_loss=completion_only_loss,
        overlong=overlong,
        where=where,
    )[0]


def encode_dataset(
    rows: list[dict],
    tokenizer,
    *,
    source: str,
    fmt: str = "auto",
    max_length: int = 512,
    completion_only_loss: bool = True,
    overlong: str = "truncate",
) -> tuple[list[dict], EncodeStats]:
    """Encode every row of ``source``; ``fmt="auto"`` detects the format from row 0. Warns when more
    than WARN_ABOVE of the rows are longer than ``max_length``, naming the length that keeps most whole."""
    if not rows:
        raise DataError(f"{source}: no rows to encode")
    if max_length < 2:
        raise DataError(f"data.max_length={max_length}: use at least 2 tokens")
    fmt = detect_format(rows[0], source) if fmt == "auto" else fmt
    stats = EncodeStats(rows=len(rows))
    examples = []
    for i, row in enumerate(rows):
        example, status, length = _encode(
            row,
            fmt,
            tokenizer,
            max_length=max_length,
            overlong=overlong,
            completion_only_loss=completion_only_loss,
            where=f"{source}: row {i}",
        )
        stats.lengths.append(length)
        stats.over_length += length > max_length
        if example is None:
            stats.dropped += 1
            if stats.first_dropped_index is None:
                stats.first_dropped_index = i
            continue
        stats.truncated += status == "truncated"
        examples.append(example)
        stats.kept += 1
        stats.tokens += len(example["input_ids"])
        stats.trainable_tokens += sum(label != IGNORE_INDEX for label in example["labels"][1:])
    if not examples:
        raise DataError(
            f"{source}: every row was dropped ({stats.summary()}); raise data.max_length "
            f"(now {max_length}) to {stats.whole_length()}, which keeps {WHOLE_SHARE:.0%} of rows whole, or "
            "check that rows have a completion to train on"
        )
    warn_if_cut(
        stats.over_length, stats.rows, f"{source} rows", max_length, stats.whole_length(), dropped=overlong == "drop"
    )
    return examples, stats
