"""``builtin:arithmetic``: integer arithmetic word problems with verifiable answers.

    polmctl run recipe=lora data.options.max_operand=50 data.options.ops='+-*' data.options.steps=2

Row: {"prompt": "...", "completion": "12 + 7 = 19. The answer is 19.", "answer": "19"}.
The completion shows the work and ends with "The answer is N."; ``extract_answer`` reads it
back from a model's output.
"""

from __future__ import annotations

import random
import re

from polmctl.data.builtin.split import sample_split

NAMES = ["Mia", "Sam", "Ava", "Leo", "Zoe", "Omar", "Ivy", "Ben", "Nora", "Raj", "Lena", "Tom"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]
ADD = ["{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?",
       "{n} had {a} {item}. A friend gave {n} {b} more. How many {item} does {n} have?",
       "There are {a} {item} in a box and {b} more are added. How many {item} are in the box?"]
SUB = ["{n} has {a} {item} and gives away {b}. How many {item} does {n} have left?",
       "There were {a} {item} on the table. {n} took {b} of them. How many {item} are left?",
       "{n} had {a} {item} and lost {b}. How many {item} does {n} have now?"]
MUL = ["{n} has {a} bags with {b} {item} in each. How many {item} does {n} have in total?",
       "Each of {a} boxes holds {b} {item}. How many {item} are there altogether?"]
TEMPLATES = {"+": ADD, "-": SUB, "*": MUL}
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
THEN = {"+": "Then {n} gets {b} more.", "-": "Then {n} gives away {b}.", "*": "Then the amount is multiplied by {b}."}
DEFAULT_N = {"train": 2000, "test": 200}


def _operands(rng: random.Random, op: str, max_operand: int, total: int | None = None) -> tuple[int, int]:
    if op == "-":
        a = total if total is not None else rng.randint(1, max_operand)
        return a, rng.randint(0, a)  # never negative
    a = total if total is not None else rng.randint(1, max_operand)
    b = rng.randint(1, max_operand if op == "+" else min(max_operand, 12))
    return a, b


def _draw(rng: random.Random, max_operand: int, ops: str, steps: int):
    op = rng.choice(ops)
    a, b = _operands(rng, op, max_operand)
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    template = rng.choice(TEMPLATES[op])
    result = APPLY[op](a, b)
    prompt = template.format(n=n, a=a, b=b, item=item)
    work = f"{a} {op.replace('*', 'x')} {b} = {result}."
    identity = (a, op, b)
    if steps == 2:
        op2 = rng.choice(ops)
        _, c = _operands(rng, op2, max_operand, total=result)
        final = APPLY[op2](result, c)
        body, question = prompt.rsplit(". ", 1) if ". " in prompt else (prompt, "")
        prompt = f"{body}. {THEN[op2].format(n=n, b=c)} {question}".strip()
        work += f" {result} {op2.replace('*', 'x')} {c} = {final}."
        result, identity = final, (a, op, b, op2, c)
    return (identity, prompt), {"prompt": prompt, "completion": f"{work} The answer is {result}.", "answer": str(result)}


def arithmetic(split: str = "train", *, n: int | None = None, max_operand: int = 30, ops: str = "+-",
               steps: int = 1, seed: int = 0) -> list[dict]:
    from polmctl.data.errors import DataError

    bad = set(ops) - set(APPLY)
    if not ops or bad:
        raise DataError(f"builtin:arithmetic option ops={ops!r}: use a subset of '+-*'")
    if steps not in (1, 2):
        raise DataError(f"builtin:arithmetic option steps={steps}: use 1 or 2")
    if max_operand < 2:
        raise DataError(f"builtin:arithmetic option max_operand={max_operand}: use 2 or more")
    count = n if n is not None else DEFAULT_N.get(split, 200)
    # The split is decided by the numbers alone (not the wording), so no test problem
    # appears in training under another phrasing.
    return sample_split(split, count, seed, lambda rng: _draw(rng, max_operand, ops, steps), name="arithmetic",
                        identity=lambda key: key[0])


ANSWER_IS = re.compile(r"answer is\s*[:=]?\s*\$?(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise(number: str) -> str | None:
    number = number.replace(",", "").rstrip(".")
    try:
        value = float(number)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def extract_answer(text: str) -> str | None:
    """The number after "The answer is", else the last number in ``text``; "19.0" -> "19"."""
    match = ANSWER_IS.findall(text)
    if match:
        return _normalise(match[-1])
    numbers = NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None
