r"""Is a model's math answer the reference answer? Plain numbers are compared as numbers (fast, no
sympy); LaTeX, fractions, expressions, sets, intervals and equations go to math-verify, which parses
both into sympy and compares them; short text answers ("Paris", "\text{Evelyn}") compare as text.

    polmctl run recipe=grpo data.source=competition_math.jsonl      # rewards: [math_answer]

``math_answer`` (polmctl/rollout/rewards.py) calls ``same_answer``; the online methods call
``uncheckable`` on every row's reference answer before training (polmctl/rollout/reward_data.py).
math-verify's timeouts use SIGALRM, which only the main thread may set: elsewhere they are off.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from math_verify import parse, verify

from polmctl.data.builtin.answers import ANY_NUMBER, normalise_number

TIMEOUT_S = 3  # per parse and per comparison; real answers take milliseconds
# With its timeouts off (off the main thread) math-verify logs that the caller must time out
# itself; there is nothing a polmctl user can do about it.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# \text{...} and friends hold words that are part of a math answer ("10\text{ cm}", "\text{(C)}").
TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
COMMAND = re.compile(r"\\[A-Za-z]+")
WORD = re.compile(r"[A-Za-z]{2,}")
DECORATION = re.compile(r"^(?:\$|\*\*|\\\(|\\\[)+|(?:\$|\*\*|\\\)|\\\])+$")
LONGEST_TEXT_ANSWER = 6  # words; a longer "answer" is a sentence or a worked solution


def _undecorated(text: str) -> str:
    r"""``text`` without surrounding $ / ** / \( \) and a final full stop."""
    text = text.strip().rstrip(".").strip()
    return DECORATION.sub("", text).strip()


def plain_number(text: Any) -> str | None:
    """Canonical text of a bare number ("1,200", "$19.0$", "19." -> "1200", "19", "19"), else None."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        text = repr(text)
    text = _undecorated(str(text))
    return normalise_number(text) if ANY_NUMBER.fullmatch(text) else None


def is_text(answer: str) -> bool:
    r"""Whether ``answer`` holds words outside LaTeX commands and \text{} ("Paris", "The answer is 19"):
    math-verify would read "Paris" as the product P*a*r*i*s, so text is compared as text."""
    return bool(WORD.search(COMMAND.sub(" ", TEXT_COMMAND.sub(" ", answer))))


def _plain_text(answer: str) -> str:
    return " ".join(TEXT_COMMAND.sub(r"\1", _undecorated(answer)).split())


def _as_math(text: str) -> str:
    """Bare LaTeX in $...$ (math-verify's LaTeX parser needs delimiters); delimited text as it is."""
    return text if any(d in text for d in ("$", "\\(", "\\[")) else f"${text}$"


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str) -> list:
    """math-verify's parse of ``text``: [] when nothing in it reads as math."""
    return parse(text, parsing_timeout=_timeout())


def same_answer(truth: Any, found: str | None, span: str | None, completion: str) -> bool:
    """Whether ``completion`` answers ``truth``. ``found`` is its number-path answer (the tag or box
    content, else the number after "The answer is", else its last number), ``span`` the text the
    completion gives as its answer (tag, box, or what follows "The answer is"; None: none)."""
    if truth is None:
        return False
    if found is not None and _canonical(found) == _canonical(truth):
        return True  # the number path: identical numbers or identical text
    truth_text = str(truth).strip()
    if not truth_text:
        return False
    if is_text(truth_text):
        return span is not None and _plain_text(span) == _plain_text(truth_text)
    if plain_number(truth_text) is not None and (span is None or plain_number(span) is not None):
        return False  # two numbers that differ, or no stated answer and its last number (if any) is not it
    if span is not None and is_text(span):
        return _plain_text(span) == _plain_text(truth_text)
    gold = parse_math(_as_math(truth_text))
    if not gold:
        return False
    answer = parse_math(_as_math(span)) if span is not None else parse_math(completion)
    return bool(answer) and verify(gold, answer, timeout_seconds=_timeout())


def _canonical(answer: Any) -> str:
    number = plain_number(answer)
    return number if number is not None else str(answer).strip()


def uncheckable(truth: Any) -> str | None:
    """Why ``truth`` cannot be checked as a reference answer (None: it can)."""
    if truth is None or (isinstance(truth, str) and not truth.strip()):
        return "is empty"
    if isinstance(truth, bool) or not isinstance(truth, (str, int, float)):
        return f"is a {type(truth).__name__}, not an answer"
    text = str(truth).strip()
    if plain_number(text) is not None:
        return None
    if is_text(text):
        if len(_plain_text(text).split()) > LONGEST_TEXT_ANSWER:
            return "is a sentence or a worked solution, not a final answer"
        return None
    parsed = parse_math(_as_math(text))  # what it cannot read comes back as the matched string only
    return None if any(not isinstance(p, str) for p in parsed) else "does not parse as math"
