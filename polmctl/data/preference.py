"""Preference rows -> token ids: paired {prompt, chosen, rejected} and unpaired
{prompt, completion, label}, with the checks that keep bad pairs out of training.

    polmctl run recipe=dpo data.source=prefs.jsonl data.max_length=1024

A pair's prompt is rendered once by ``format_prompt`` (the same text training, evaluation
and chat use) and each answer by ``format_completion``. Rows whose chosen equals
rejected, with an empty answer, or whose prompt leaves no room for an answer within
``max_length`` are counted, the first index reported, and skipped (``data.bad_rows=skip``)
or stop the run (``data.bad_rows=error``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polmctl.data.formats import detect_format, format_completion, format_prompt
from polmctl.data.tokenize import WHOLE_SHARE, length_to_keep, warn_if_cut
from polmctl.errors import DataError
from polmctl.losses import IGNORE_INDEX


@dataclass
class PreferenceStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    identical: int = 0
    empty: int = 0
    too_long: int = 0
    first_skipped_index: int | None = None
    answers: int = 0  # chosen and rejected counted apart (unpaired: one completion a row)
    answers_cut: int = 0  # answers longer than their room at max_length (truncated or skipped)
    lengths: list[int] = field(default_factory=list, repr=False)  # each row's prompt + longest answer, in tokens

    def whole_length(self, share: float = WHOLE_SHARE) -> int | None:
        """The data.max_length that keeps ``share`` of the rows (prompt and every answer) whole."""
        return length_to_keep(self.lengths, share)

    def skip(self, index: int, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if self.first_skipped_index is None:
            self.first_skipped_index = index

    def summary(self) -> str:
        text = f"{self.kept}/{self.rows} rows"
        skipped = {k: getattr(self, k) for k in ("identical", "empty", "too_long") if getattr(self, k)}
        if self.truncated:
            text += f", {self.truncated} answers truncated"
        if skipped:
            reasons = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items())
            text += f", skipped {reasons} (first: row {self.first_skipped_index})"
        return text


def _answer_ids(prompt, answer, tokenizer, where: str) -> list[int]:
    return tokenizer(format_completion(prompt, answer, tokenizer, where=where), add_special_tokens=False)["input_ids"]


ROW_SHAPES = {
    "preference": "paired rows {prompt, chosen, rejected}",
    "unpaired": "unpaired rows {prompt, completion, label}",
}


def encode_preference_rows(
    rows: list[dict], tokenizer, data, *, recipe: str, fmt: str = "preference"
) -> tuple[list[dict], PreferenceStats]:
    """``encode_preference_dataset`` with the ``data`` config's limits, for a training
    recipe that takes only ``fmt`` rows (paired ``preference`` or ``unpaired``)."""
    return encode_preference_dataset(
        rows,
        tokenizer,
        source=data.source,
        max_length=data.max_length,
        overlong=data.overlong,
        bad_rows=data.bad_rows,
        require=(recipe, fmt),
    )


def encode_preference_dataset(
    rows: list[dict],
    tokenizer,
    *,
    source: str,
    max_length: int = 512,
    overlong: str = "truncate",
    bad_rows: str = "skip",
    require: tuple[str, str] | None = None,
) -> tuple[list[dict], PreferenceStats]:
    """Encoded rows: {"prompt_ids", "chosen_ids", "rejected_ids"} (paired, plus "margin" where
    the row has one) or {"prompt_ids", "completion_ids", "label"} (unpaired), ids without padding.
    ``require=(recipe, fmt)`` refuses rows of the other format, naming the recipe. Warns when more
    than WARN_ABOVE of the answers lose their last tokens, naming the length that keeps most whole."""
    if not rows:
        raise DataError(f"{source}: no rows to encode")
    fmt = detect_format(rows[0], source)
    answers = {"preference": ("chosen", "rejected"), "unpaired": ("completion",)}.get(fmt)
    if answers is None:
        raise DataError(
            f"{source}: rows have the {fmt!r} format; a preference recipe needs "
            "{prompt, chosen, rejected} or {prompt, completion, label} rows"
        )
    if require and fmt != require[1]:  # (recipe, the one format it takes)
        other = "recipe=kto" if fmt == "unpaired" else "recipe=dpo (or another pairwise recipe)"
        raise DataError(
            f"{source}: {require[0]} needs {ROW_SHAPES[require[1]]}, not {ROW_SHAPES[fmt]}; those train with {other}"
        )
    stats, examples = PreferenceStats(rows=len(rows)), []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        missing = [c for c in ("prompt", *answers) if c not in row]
        if missing:
            raise DataError(f"{where}: column '{missing[0]}' is missing")
        if any(row[c] in ("", None, []) for c in answers):
            if bad_rows == "error":
                raise DataError(f"{where}: an answer column is empty; fill it or remove the row")
            stats.skip(i, "empty")
            continue
        if fmt == "preference" and row["chosen"] == row["rejected"]:
            if bad_rows == "error":
                raise DataError(f"{where}: chosen equals rejected, so the pair teaches nothing; remove the row")
            stats.skip(i, "identical")
            continue
        prompt_ids = tokenizer(
            format_prompt(row["prompt"], tokenizer, where=f"{where}, column 'prompt'"), add_special_tokens=False
        )["input_ids"]
        room = max_length - len(prompt_ids)
        full = {c: _answer_ids(row["prompt"], row[c], tokenizer, f"{where}, column '{c}'") for c in answers}
        stats.lengths.append(len(prompt_ids) + max(len(ids) for ids in full.values()))
        stats.answers += len(answers)
        stats.answers_cut += sum(len(ids) > max(room, 0) for ids in full.values())
        if room < 1:
            if overlong == "error" or bad_rows == "error":
                raise DataError(
                    f"{where}: the prompt alone has {len(prompt_ids)} tokens, more than "
                    f"data.max_length={max_length}; raise it or shorten the prompt"
                )
            stats.skip(i, "too_long")
            continue
        example: dict = {"prompt_ids": prompt_ids}
        cut = False
        for column in answers:
            example[f"{column}_ids"] = full[column][:room]
            cut |= len(full[column]) > room
        if cut and overlong != "truncate":
            if overlong == "error":
                raise DataError(
                    f"{where} is longer than data.max_length={max_length}; raise it or set data.overlong=truncate|drop"
                )
            stats.skip(i, "too_long")
            continue
        if fmt == "preference" and example["chosen_ids"] == example["rejected_ids"]:
            stats.skip(i, "identical")  # different text, but identical once truncated
            continue
        if fmt == "unpaired":
            example["label"] = _label(row["label"], f"{where}, column 'label'")
        if fmt == "preference" and row.get("margin") is not None:  # reward modelling's optional required gap
            example["margin"] = _margin(row["margin"], f"{where}, column 'margin'")
        stats.truncated += cut
        stats.kept += 1
        examples.append(example)
    if not examples:
        raise DataError(f"{source}: no usable preference row ({stats.summary()})")
    warn_if_cut(
        stats.answers_cut, stats.answers, f"{source} answers", max_length, stats.whole_length(), overlong == "drop"
    )
    return examples, stats


def _margin(value, where: str) -> float:
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a number, got {value!r}") from None
    if margin != margin or margin in (float("inf"), float("-inf")):
        raise DataError(f"{where}: expected a finite number, got {value!r}")
    return margin


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise DataError(f"{where}: expected true or false, got {value!r}")


def pad_sequences(sequences: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    lab = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, (s, l) in enumerate(zip(sequences, labels)):
        ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), torch.tensor(l), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def preference_collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows: the B chosen sequences, then the B rejected ones, so a
    single forward pass scores both; labels mark the answer tokens only."""
    seqs, labels = [], []
    for column in ("chosen_ids", "rejected_ids"):
        for e in examples:
            seqs.append(e["prompt_ids"] + e[column])
            labels.append([IGNORE_INDEX] * len(e["prompt_ids"]) + e[column])
    return pad_sequences(seqs, labels, pad_token_id)
