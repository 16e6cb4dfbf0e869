"""Edit requests: what to rewrite, checked row by row, and where the subject sits in a prompt.

    polmctl run recipe=edit method.requests=my_edits.jsonl

A request row (a .jsonl/.json/.csv/.parquet file, a hub dataset, or builtin:counterfacts):

    {"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy",
     "target_true": "France",                                  # optional: the old answer
     "paraphrases": ["The city of Paris is the capital of"],  # optional: same fact, other words
     "neighbours": ["Lyon is a city in"]}                      # optional: other subjects' prompts

``prompt`` holds exactly one ``{}`` where the subject goes; prompts are raw text (no chat
template), as the editing literature measures them. A neighbour is a prompt string whose answer
is ``target_true``, or ``{"prompt": ..., "answer": ...}``. CounterFact's own rows
(``requested_rewrite``, ``paraphrase_prompts``, ``neighborhood_prompts``) are read as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polmctl.errors import DataError

BUILTIN = "builtin:counterfacts"


@dataclass(frozen=True)
class Neighbour:
    prompt: str
    answer: str


@dataclass
class EditRequest:
    subject: str
    prompt: str  # a template with one {}
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    where: str = "request"

    @property
    def text(self) -> str:
        """The prompt with the subject in place."""
        return fill(self.prompt, self.subject)

    def as_row(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighbours": [{"prompt": n.prompt, "answer": n.answer} for n in self.neighbours],
        }


def fill(template: str, subject: str) -> str:
    # replace, not str.format: a prompt may hold other braces
    return template.replace("{}", subject, 1)


def _text(row: dict, column: str, where: str, required: bool = True) -> str | None:
    value = row.get(column)
    if value is None or value == "":
        if required:
            state = "is missing" if column not in row else "is empty"
            raise DataError(f"{where}, column '{column}' {state}; every edit request needs {column}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}, column '{column}' is a {type(value).__name__}; expected text")
    return value


def _prompts(value: Any, where: str, column: str) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if not isinstance(value, list):
        raise DataError(f"{where}, column '{column}' is a {type(value).__name__}; expected a list of prompts")
    return value


def _flatten_counterfact(row: dict) -> dict:
    """CounterFact's nested row -> the flat request row."""
    rewrite = row["requested_rewrite"]

    def text(value):
        return value.get("str") if isinstance(value, dict) else value

    return {
        "subject": rewrite.get("subject"),
        "prompt": rewrite.get("prompt"),
        "target_new": text(rewrite.get("target_new")),
        "target_true": text(rewrite.get("target_true")),
        "paraphrases": row.get("paraphrase_prompts"),
        "neighbours": row.get("neighborhood_prompts"),
    }


def parse_request(row: dict, where: str) -> EditRequest:
    """One request row, checked; a DataError names ``where`` (source and row) and the column."""
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, not a row with named columns")
    if isinstance(row.get("requested_rewrite"), dict):
        row = _flatten_counterfact(row)
    subject = _text(row, "subject", where)
    prompt = _text(row, "prompt", where)
    target_new = _text(row, "target_new", where)
    target_true = _text(row, "target_true", where, required=False)
    if prompt.count("{}") != 1:
        raise DataError(
            f"{where}, column 'prompt': {prompt!r} must hold exactly one {{}} where the subject goes, "
            f"e.g. '{{}} is the capital of'"
        )
    if not subject.strip() or not target_new.strip():
        raise DataError(f"{where}: subject and target_new must not be blank")
    if target_true is not None and target_true.strip() == target_new.strip():
        raise DataError(f"{where}: target_new equals target_true ({target_new!r}); an edit must change the answer")
    paraphrases = []
    for i, p in enumerate(_prompts(row.get("paraphrases"), where, "paraphrases")):
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{where}, column 'paraphrases', item {i}: expected a non-empty prompt string")
        paraphrases.append(fill(p, subject) if "{}" in p else p)
    neighbours = []
    for i, n in enumerate(_prompts(row.get("neighbours"), where, "neighbours")):
        spot = f"{where}, column 'neighbours', item {i}"
        if isinstance(n, dict):
            neighbours.append(Neighbour(_text(n, "prompt", spot), _text(n, "answer", spot)))
        elif isinstance(n, str) and n.strip():
            if target_true is None:
                raise DataError(
                    f"{spot}: a neighbour given as a prompt string takes target_true as its answer, and this "
                    "request has none; add target_true or give the neighbour as {prompt, answer}"
                )
            neighbours.append(Neighbour(n, target_true))
        else:
            raise DataError(f"{spot}: expected a prompt string or {{prompt, answer}}, got {n!r:.60}")
    return EditRequest(subject, prompt, target_new, target_true, paraphrases, neighbours, where)


def load_requests(source: str, split: str = "train", *, seed: int = 0) -> list[EditRequest]:
    """Every request of ``source``: builtin:counterfacts (generated, shuffled by ``seed``), a local file or a
    hub dataset (read by polmctl.data.load_rows), each row checked."""
    if source == BUILTIN:
        from polmctl.editing.facts import fact_requests

        return fact_requests(seed=seed)
    if source.startswith("builtin:"):
        raise DataError(
            f"method.requests={source}: the builtin edit requests are {BUILTIN}; or give a .jsonl/.json/.csv/"
            ".parquet file or a hub dataset of {subject, prompt, target_new} rows"
        )
    from polmctl.data import load_rows

    rows = load_rows(source, split)
    return [parse_request(row, f"{source}: row {i}") for i, row in enumerate(rows)]


# -- the subject in a tokenized prompt ---------------------------------------------------------

FACT_TOKENS = ("subject_last", "last")


@dataclass(frozen=True)
class Located:
    """Token ids of a text, the subject's first and last token, and the lookup position: where
    the fact is read and written (the subject's last token, or with ``fact_token="last"`` the
    text's last token, the reference code's two strategies)."""

    ids: list[int]
    subject_first: int
    subject_last: int
    position: int


def locate(tokenizer, text: str, start: int, end: int, where: str = "prompt", fact_token: str = "subject_last"):
    """Tokenize ``text`` (no special tokens) and find the tokens that cover characters
    ``[start, end)`` (the subject)."""
    if fact_token not in FACT_TOKENS:
        raise ValueError(f"fact_token must be one of {FACT_TOKENS}, got {fact_token!r}")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(spans) if a < end and b > start]
    else:  # a slow tokenizer has no offsets: count the tokens of the text up to the subject's end
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        before = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"]) if start else 0
        upto = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
        inside = list(range(min(before, upto - 1), upto))
    if not inside or not ids:
        raise DataError(f"{where}: no token covers the subject {text[start:end]!r} in {text!r}")
    position = inside[-1] if fact_token == "subject_last" else len(ids) - 1
    return Located(list(ids), inside[0], inside[-1], position)


def locate_subject(
    tokenizer, template: str, subject: str, prefix: str = "", where: str = "prompt", fact_token: str = "subject_last"
) -> Located:
    """``prefix + template`` with the subject filled in, tokenized, with the subject's tokens."""
    start = len(prefix) + template.index("{}")
    return locate(tokenizer, prefix + fill(template, subject), start, start + len(subject), where, fact_token)


def target_ids(tokenizer, prompt_text: str, target: str) -> list[int]:
    """The tokens of ``target`` as it follows ``prompt_text``: after one space, unless either side
    already has it (the reference code's convention: " Italy" after "... capital of")."""
    joined = target if (not prompt_text or prompt_text[-1].isspace() or target[:1].isspace()) else " " + target
    ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"target {target!r} tokenizes to nothing")
    return ids
