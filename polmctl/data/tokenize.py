"""Rows -> token ids and labels, with the loss mask and the over-length policy.

    polmctl run recipe=sft data.max_length=1024 data.overlong=drop data.completion_only_loss=false

Each text segment is tokenized on its own (no special tokens added) and concatenated, so
the prompt's tokens are exactly ``tokenizer(format_prompt(p), add_special_tokens=False)``:
what evaluation and generation feed the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from polmctl.data.errors import DataError
from polmctl.data.formats import conversation_segments, detect_format, format_completion, format_prompt

IGNORE_INDEX = -100


@dataclass
class EncodeStats:
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


def row_segments(row: dict, fmt: str, tokenizer, where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one row in format ``fmt``."""
    if fmt == "text":
        if not isinstance(row.get("text"), str) or not row["text"]:
            raise DataError(f"{where}, column 'text': expected non-empty text")
        return [(row["text"] + (tokenizer.eos_token or ""), True)]
    if fmt == "messages":
        return conversation_segments(row.get("messages"), tokenizer, f"{where}, column 'messages'")
    if fmt == "prompt_completion":
        for column in ("prompt", "completion"):
            if row.get(column) is None or (isinstance(row[column], str) and not row[column]):
                raise DataError(f"{where}, column '{column}': empty")
        return [(format_prompt(row["prompt"], tokenizer), False),
                (format_completion(row["prompt"], row["completion"], tokenizer), True)]
    raise DataError(f"{where}: format {fmt!r} is not a supervised format (text, messages, prompt_completion); "
                    "preference rows need a preference recipe")


def encode_row(row: dict, fmt: str, tokenizer, *, max_length: int, completion_only_loss: bool = True,
               overlong: str = "truncate", where: str = "row") -> tuple[dict | None, bool]:
    """``({"input_ids", "labels"} or None if dropped, truncated?)`` for one row."""
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_len = None  # tokens before the first trained segment
    for text, trained in row_segments(row, fmt, tokenizer, where):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained and prompt_len is None:
            prompt_len = len(input_ids)
        input_ids += ids
        labels += ids if (trained or not completion_only_loss) else [IGNORE_INDEX] * len(ids)
    truncated = False
    if len(input_ids) > max_length:
        if overlong == "error":
            raise DataError(f"{where} has {len(input_ids)} tokens, more than data.max_length={max_length}; "
                            "raise data.max_length or set data.overlong=truncate|drop")
        if overlong == "drop" or (prompt_len or 0) >= max_length:
            return None, False
        input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], True
    if all(l == IGNORE_INDEX for l in labels[1:]):
        return None, truncated
    return {"input_ids": input_ids, "labels": labels}, truncated


def encode_dataset(rows: list[dict], tokenizer, *, source: str, fmt: str = "auto", max_length: int = 512,
                   completion_only_loss: bool = True, overlong: str = "truncate") -> tuple[list[dict], EncodeStats]:
    if not rows:
        raise DataError(f"{source}: no rows to encode")
    fmt = detect_format(rows[0], source) if fmt == "auto" else fmt
    stats = EncodeStats(rows=len(rows))
    examples = []
    for i, row in enumerate(rows):
        example, truncated = encode_row(row, fmt, tokenizer, max_length=max_length, overlong=overlong,
                                        completion_only_loss=completion_only_loss, where=f"{source}: row {i}")
        stats.truncated += truncated
        if example is None:
            stats.dropped += 1
            stats.first_dropped_index = i if stats.first_dropped_index is None else stats.first_dropped_index
            continue
        examples.append(example)
        stats.kept += 1
        stats.tokens += len(example["input_ids"])
        stats.trainable_tokens += sum(l != IGNORE_INDEX for l in example["labels"][1:])
    if not examples:
        raise DataError(f"{source}: every row was dropped ({stats.summary()}); raise data.max_length "
                        "or check that rows have a completion to train on")
    return examples, stats
