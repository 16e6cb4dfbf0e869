"""Reading a numeric answer back out of generated text, for exact-match evaluation.

extract_answer("12 + 7 = 19. The answer is 19.")   -> "19"
extract_answer("So she has 1,200 coins.")          -> "1200"
extract_answer("The answer is **19.0**")           -> "19"
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional minus, digits with optional thousands commas ("1,200", but "1,2"
# is two numbers), optional decimals. A trailing "." or "," is punctuation, not part of it.
# Not inside a word or after a digit ("5-3" is 5 and 3, not 5 and -3).
NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
# "The answer is" followed by light decoration: ":", "=", "$", markdown bold, \boxed{.
ANSWER_IS = re.compile(r"answer is\s*[:=]?\s*(?:\$|\*\*|\\boxed\{|\\\(|\s)*(" + NUMBER + ")", re.IGNORECASE)
ANY_NUMBER = re.compile(NUMBER)


def normalise_number(number: str) -> str | None:
    """Canonical text of a number: no commas, integers without decimals ("19.0" -> "19")."""
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():  # "Infinity" and "NaN" parse as Decimals but are no answer
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The number after the last "The answer is", else the last number in ``text``;
    None when there is no number at all."""
    if not text:
        return None
    found = ANSWER_IS.findall(text) or ANY_NUMBER.findall(text)
    return normalise_number(found[-1]) if found else None
