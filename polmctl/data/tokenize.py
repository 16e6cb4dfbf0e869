"""Rows -> token ids and labels, with the loss mask and the over-length policy.

    polmctl run recipe=sft data.max_length=1024 data.overlong=drop data.completion_only_loss=false

Each text segment is tokenized on its own (no special tokens added) and concatenated, so
the prompt's tokens are exactly ``tokenizer(format_prompt(p), add_special_tokens=False)``:
what evaluation and generation feed the model. Labels are aligned with input_ids (the
Hugging Face convention: -100 where nothing is trained; the shift happens in the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

from polmctl.data.formats import conversation_segments, detect_format, format_completion, format_prompt
from polmctl.errors import DataError
from polmctl.losses import IGNORE_INDEX

SUPERVISED = ("text", "messages", "prompt_completion")
OVERLONG = ("truncate", "drop", "error")


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
) -> tuple[dict | None, str]:
    """(example or None, what happened: "kept" | "truncated" | "dropped")."""
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
    status = "kept"
    if len(input_ids) > max_length:
        if overlong == "error":
            raise DataError(
                f"{where} has {len(input_ids)} tokens, more than data.max_length={max_length}; "
                "raise data.max_length or set data.overlong=truncate|drop"
            )
        if overlong == "drop" or (prompt_len or 0) >= max_length:
            return None, "dropped"
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    # labels[0] is never predicted (nothing precedes it), so it does not count as trained.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None, "dropped"
    return {"input_ids": input_ids, "labels": labels}, status


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
    """Encode every row of ``source``; ``fmt="auto"`` detects the format from row 0."""
    if not rows:
        raise DataError(f"{source}: no rows to encode")
    if max_length < 2:
        raise DataError(f"data.max_length={max_length}: use at least 2 tokens")
    fmt = detect_format(rows[0], source) if fmt == "auto" else fmt
    stats = EncodeStats(rows=len(rows))
    examples = []
    for i, row in enumerate(rows):
        example, status = _encode(
            row,
            fmt,
            tokenizer,
            max_length=max_length,
            overlong=overlong,
            completion_only_loss=completion_only_loss,
            where=f"{source}: row {i}",
        )
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
            f"(now {max_length}) or check that rows have a completion to train on"
        )
    return examples, stats
