"""What a row says, for every row format polmctl trains on: the text duplicates are judged on, the
(instruction, answer) pair IFD and reward models score, and the token lengths training sees.

    polmctl data inspect rows.jsonl      (the callers: polmctl/curation/summary.py, screen.py)
"""

from __future__ import annotations

from typing import Any

from polmctl.data.formats import check_messages
from polmctl.data.tokenize import SUPERVISED, row_segments
from polmctl.errors import DataError

# The columns that hold a row's text, per format (polmctl.data.formats.FORMATS).
TEXT_COLUMNS = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # a message list
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    return "" if value is None else str(value)


def row_text(row: dict, fmt: str) -> str:
    """The row's text columns joined, one per line (messages as ``role: content`` lines)."""
    return "\n".join(_as_text(row.get(column)) for column in TEXT_COLUMNS[fmt])


def instruction_answer(row: dict, fmt: str, where: str) -> tuple[Any, str]:
    """(instruction, answer): the prompt (a string or message list) and the answer that follows it.
    A conversation's answer is its last assistant turn, its instruction everything before it."""
    if fmt == "text":
        raise DataError(
            f"{where}: a text row has no instruction to condition on; IFD and reward scores need "
            "prompt/completion, messages or preference rows"
        )
    if fmt == "messages":
        messages = row.get("messages")
        check_messages(messages, f"{where}, column 'messages'")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{where}, column 'messages': the last message must be the assistant's answer to a prompt")
        return messages[:-1], messages[-1]["content"]
    answer_column = "chosen" if fmt == "preference" else "completion"
    prompt, answer = row.get("prompt"), row.get(answer_column)
    if not prompt or not isinstance(answer, str) or not answer:
        missing = "prompt" if not prompt else answer_column
        raise DataError(f"{where}, column '{missing}' is missing or empty (or not text); fill it or drop the row")
    return prompt, answer


def token_lengths(row: dict, fmt: str, tokenizer, where: str) -> tuple[int, int]:
    """(prompt tokens, answer tokens) as training renders the row (chat template, end-of-turn marker):
    text rows are all answer; a conversation's assistant turns are its answer; a preference row
    counts its chosen answer."""
    if fmt not in SUPERVISED:
        answer_column = "chosen" if fmt == "preference" else "completion"
        row, fmt = {"prompt": row.get("prompt"), "completion": row.get(answer_column)}, "prompt_completion"
    prompt = answer = 0
    for text, trained in row_segments(row, fmt, tokenizer, where):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if trained:
            answer += n
        else:
            prompt += n
    return prompt, answer
