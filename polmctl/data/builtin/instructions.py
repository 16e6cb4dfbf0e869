"""``builtin:instructions``: a small general instruction set with verifiable answers.

    polmctl run recipe=sft data=instructions

Conversational rows: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "answer": ...}.
Tasks: reverse a word, uppercase a phrase, count letters, convert units, sort words,
pick the larger number; several phrasings each. ``answer`` occurs verbatim in the reply.
"""

from __future__ import annotations

import random

from polmctl.data.builtin.split import sample_split

WORDS = [
    "apple",
    "river",
    "garden",
    "planet",
    "silver",
    "window",
    "candle",
    "forest",
    "bridge",
    "pocket",
    "rocket",
    "market",
    "yellow",
    "winter",
    "pepper",
    "castle",
    "button",
    "mirror",
    "ladder",
    "orange",
    "tiger",
    "piano",
    "cloud",
    "stone",
    "honey",
    "lemon",
    "ocean",
    "paper",
    "smile",
    "train",
]
UNITS = [
    ("km", 1000, "m"),
    ("hours", 60, "minutes"),
    ("kg", 1000, "g"),
    ("minutes", 60, "seconds"),
    ("m", 100, "cm"),
    ("days", 24, "hours"),
]

# Each task: rng -> (identity, question, reply, answer). The identity (task and inputs,
# not the phrasing) decides the split.


def _reverse(rng: random.Random):
    w = rng.choice(WORDS)
    ask = rng.choice(["Reverse the word '{w}'.", "Write '{w}' backwards.", "What is '{w}' spelled in reverse?"])
    return ("reverse", w), ask.format(w=w), f"'{w}' reversed is '{w[::-1]}'.", w[::-1]


def _upper(rng: random.Random):
    phrase = " ".join(rng.sample(WORDS, 2))
    ask = rng.choice(["Write '{p}' in capital letters.", "Convert '{p}' to uppercase.", "Uppercase this phrase: {p}"])
    return ("upper", phrase), ask.format(p=phrase), phrase.upper(), phrase.upper()


def _count(rng: random.Random):
    w = rng.choice(WORDS)
    ask = rng.choice(
        [
            "How many letters are in the word '{w}'?",
            "Count the letters in '{w}'.",
            "What is the length of the word '{w}' in letters?",
        ]
    )
    return ("count", w), ask.format(w=w), f"'{w}' has {len(w)} letters. The answer is {len(w)}.", str(len(w))


def _units(rng: random.Random):
    unit, factor, target = rng.choice(UNITS)
    x = rng.randint(1, 30)
    ask = rng.choice(["Convert {x} {u} to {t}.", "How many {t} are in {x} {u}?", "Express {x} {u} in {t}."])
    result = x * factor
    return (
        ("units", x, unit),
        ask.format(x=x, u=unit, t=target),
        f"{x} {unit} is {result} {target}. The answer is {result}.",
        str(result),
    )


def _sort(rng: random.Random):
    words = rng.sample(WORDS, 3)
    ask = rng.choice(
        ["Sort these words alphabetically: {w}.", "Put in alphabetical order: {w}.", "Arrange {w} from A to Z."]
    )
    answer = ", ".join(sorted(words))
    return ("sort", tuple(words)), ask.format(w=", ".join(words)), answer, answer


def _larger(rng: random.Random):
    a, b = rng.sample(range(1, 1000), 2)
    ask = rng.choice(
        [
            "Which number is larger, {a} or {b}?",
            "What is the bigger number: {a} or {b}?",
            "Of {a} and {b}, which is greater?",
        ]
    )
    return ("larger", a, b), ask.format(a=a, b=b), f"{max(a, b)} is larger. The answer is {max(a, b)}.", str(max(a, b))


TASKS = [_reverse, _upper, _count, _units, _sort, _larger]
DEFAULT_N = {"train": 1000, "test": 100}


def _draw(rng: random.Random):
    identity, question, reply, answer = rng.choice(TASKS)(rng)
    row = {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
        "answer": answer,
    }
    return (identity, question), row


def instructions(split: str = "train", *, n: int | None = None, seed: int = 0) -> list[dict]:
    """``n`` conversational rows of ``split`` (train: 1000, test: 100 by default)."""
    count = n if n is not None else DEFAULT_N.get(split, DEFAULT_N["test"])
    return sample_split(split, count, seed, _draw, name="instructions", identity=lambda key: key[0])
