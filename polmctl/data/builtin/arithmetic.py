"""``builtin:arithmetic``: integer arithmetic word problems with verifiable answers.

    polmctl run recipe=lora data.options.max_operand=50 data.options.ops='+-*' data.options.steps=2

Row: {"prompt": "Mia has 12 apples and buys 7 more. How many apples does Mia have now?",
      "completion": "12 + 7 = 19. The answer is 19.", "answer": "19"}.
The completion shows the work and ends with "The answer is N."; ``extract_answer`` reads
the number back from a model's output. Results are never negative.
"""

from __future__ import annotations

import random

from polmctl.data.builtin.answers import extract_answer
from polmctl.data.builtin.split import check_int, sample_split
from polmctl.errors import DataError

NAMES = ["Mia", "Sam", "Ava", "Leo", "Zoe", "Omar", "Ivy", "Ben", "Nora", "Raj", "Lena", "Tom"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
ADD = [
    "{n} has {a} {item} and buys {b} more. How many {item} does {n} have now?",
    "{n} had {a} {item}. A friend gave {n} {b} more. How many {item} does {n} have?",
    "There are {a} {item} in a box and {b} more are added. How many {item} are in the box?",
    "{n} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {n} collect in all?",
]
SUB = [
    "{n} has {a} {item} and gives away {b}. How many {item} does {n} have left?",
    "There were {a} {item} on the table. {n} took {b} of them. How many {item} are left?",
    "{n} had {a} {item} and lost {b}. How many {item} does {n} have now?",
    "A shop had {a} {item} and sold {b}. How many {item} does the shop have left?",
]
MUL = [
    "{n} has {a} bags with {b} {item} in each. How many {item} does {n} have in total?",
    "Each of {a} boxes holds {b} {item}. How many {item} are there altogether?",
    "{n} buys {a} packs of {item}, and every pack has {b} {item}. How many {item} did {n} buy?",
]
TEMPLATES = {"+": ADD, "-": SUB, "*": MUL}
# The second step of a two-step problem; worded without a person so it fits every template.
THEN = {
    "+": "Then {b} more are added.",
    "-": "Then {b} of them are taken away.",
    "*": "Then the number of {item} is multiplied by {b}.",
}
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
SHOWN = {"+": "+", "-": "-", "*": "x"}  # how the worked solution writes each operator
MAX_FACTOR = 12  # multiplication keeps one factor small so products stay readable
DEFAULT_N = {"train": 2000, "test": 200}

__all__ = ["arithmetic", "extract_answer"]


def _second_operand(rng: random.Random, op: str, a: int, max_operand: int) -> int:
    if op == "-":
        return rng.randint(min(1, a), a)  # never below zero
    if op == "*":
        return rng.randint(2, min(max_operand, MAX_FACTOR))
    return rng.randint(1, max_operand)


def _draw(rng: random.Random, max_operand: int, ops: str, steps: int) -> tuple[tuple, dict]:
    op = rng.choice(ops)
    a = rng.randint(1, max_operand)
    b = _second_operand(rng, op, a, max_operand)
    result = APPLY[op](a, b)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    prompt = rng.choice(TEMPLATES[op]).format(n=name, a=a, b=b, item=item)
    work = f"{a} {SHOWN[op]} {b} = {result}."
    identity: tuple = (a, op, b)
    if steps == 2:
        op2 = rng.choice(ops)
        c = _second_operand(rng, op2, result, max_operand)
        final = APPLY[op2](result, c)
        facts = prompt.rsplit(". ", 1)[0]  # every template is "<facts>. <question>"
        # The first question may no longer fit ("How many did Ben buy?"), so ask anew.
        prompt = f"{facts}. {THEN[op2].format(b=c, item=item)} How many {item} are there now?"
        work += f" {result} {SHOWN[op2]} {c} = {final}."
        result, identity = final, (a, op, b, op2, c)
    row = {"prompt": prompt, "completion": f"{work} The answer is {result}.", "answer": str(result)}
    return (identity, prompt), row


def arithmetic(
    split: str = "train", *, n: int | None = None, max_operand: int = 30, ops: str = "+-", steps: int = 1, seed: int = 0
) -> list[dict]:
    """``n`` word problems of ``split`` (train: 2000, test: 200 by default).

    With the default ``max_operand`` 30 and ``ops`` "+-" there are about 220 distinct
    held-out problems (with 20, about 80), so an evaluation of 100-200 rows asks mostly
    different problems.

    The split is decided by the numbers and operators alone, never the wording, so no
    test problem appears in training in other words.
    """
    if not isinstance(ops, str) or not ops or set(ops) - set(APPLY):
        raise DataError(f"builtin:arithmetic option ops={ops!r}: use a non-empty subset of '+-*' (data.options.ops)")
    if steps not in (1, 2):
        raise DataError(f"builtin:arithmetic option steps={steps!r}: use 1 or 2 (data.options.steps)")
    check_int("arithmetic", "max_operand", max_operand, 2)
    count = n if n is not None else DEFAULT_N.get(split, DEFAULT_N["test"])
    ops = "".join(sorted(set(ops)))  # "+-" and "-+" give the same problems
    return sample_split(
        split,
        count,
        seed,
        lambda rng: _draw(rng, max_operand, ops, steps),
        name="arithmetic",
        identity=lambda key: key[0],
    )
