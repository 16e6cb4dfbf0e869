"""``builtin:instructions``: a small general instruction set with verifiable answers.

    polmctl run recipe=sft data=instructions

Conversational rows: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "answer": ...}.
Tasks: reverse a word, uppercase a phrase, count letters, convert units, sort words,
pick the larger number; several phrasings each.
"""

from __future__ import annotations

import random

from polmctl.data.builtin.split import sample_split

WORDS = ["apple", "river", "garden", "planet", "silver", "window", "candle", "forest", "bridge", "pocket",
         "rocket", "market", "yellow", "winter", "pepper", "castle", "button", "mirror", "ladder", "orange",
         "tiger", "piano", "cloud", "stone", "honey", "lemon", "ocean", "paper", "smile", "train"]


def _reverse(rng):
    w = rng.choice(WORDS)
    ask = rng.choice(["Reverse the word '{w}'.", "Write '{w}' backwards.", "What is '{w}' spelled in reverse?"])
    return ("reverse", w), ask.format(w=w), f"'{w}' reversed is '{w[::-1]}'.", w[::-1]


def _upper(rng):
    phrase = " ".join(rng.sample(WORDS, 2))
    ask = rng.choice(["Write '{p}' in capital letters.", "Convert '{p}' to uppercase."])
    return ("upper", phrase), ask.format(p=phrase), phrase.upper(), phrase.upper()


def _count(rng):
    w = rng.choice(WORDS)
    ask = rng.choice(["How many letters are in the word '{w}'?", "Count the letters in '{w}'."])
    return ("count", w), ask.format(w=w), f"'{w}' has {len(w)} letters. The answer is {len(w)}.", str(len(w))


def _units(rng):
    unit, factor, target = rng.choice([("km", 1000, "m"), ("hours", 60, "minutes"), ("kg", 1000, "g"), ("minutes", 60, "seconds")])
    x = rng.randint(1, 30)
    ask = rng.choice(["Convert {x} {u} to {t}.", "How many {t} are in {x} {u}?"])
    return ("units", x, unit), ask.format(x=x, u=unit, t=target), f"{x} {unit} is {x * factor} {target}. The answer is {x * factor}.", str(x * factor)


def _sort(rng):
    words = rng.sample(WORDS, 3)
    ask = rng.choice(["Sort these words alphabetically: {w}.", "Put in alphabetical order: {w}."])
    answer = ", ".join(sorted(words))
    return ("sort", tuple(words)), ask.format(w=", ".join(words)), answer, answer


def _larger(rng):
    a, b = rng.sample(range(1, 1000), 2)
    ask = rng.choice(["Which number is larger, {a} or {b}?", "What is the bigger number: {a} or {b}?"])
    return ("larger", a, b), ask.format(a=a, b=b), f"{max(a, b)} is larger. The answer is {max(a, b)}.", str(max(a, b))


TASKS = [_reverse, _upper, _count, _units, _sort, _larger]
DEFAULT_N = {"train": 1000, "test": 100}


def _draw(rng: random.Random):
    key, question, reply, answer = rng.choice(TASKS)(rng)
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], "answer": answer}
    return (key, question), row


def instructions(split: str = "train", *, n: int | None = None, seed: int = 0) -> list[dict]:
    count = n if n is not None else DEFAULT_N.get(split, 100)
    return sample_split(split, count, seed, _draw, name="instructions", identity=lambda key: key[0])
