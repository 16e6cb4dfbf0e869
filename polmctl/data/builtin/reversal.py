"""``builtin:reversal``: reverse a short list of words (or spell one word backwards), answers
checkable by exact match.

    polmctl run recipe=lora data=reversal eval.tasks=[reversal]
    polmctl run recipe=lora data=reversal data.options.mode=letters data.options.max_items=5

Row (mode=words, the default):
    {"prompt": "Reverse the order of these words: lamp, river, cold, seed",
     "completion": "The answer is seed, cold, river, lamp.", "answer": "seed, cold, river, lamp"}
Row (mode=letters): {"prompt": "Spell the word 'lamp' backwards.", "completion": "The answer is
pmal.", "answer": "pmal"}.

``extract_reversal_answer`` reads the answer back from a model's output in the same
canonical form as the ``answer`` column (lowercase words joined by ", "), so the eval task
``reversal`` is plain exact match.
"""

from __future__ import annotations

import random
import re

from polmctl.data.builtin.split import check_int, sample_split
from polmctl.errors import DataError

# Common short English words, each a single token or two for most tokenizers.
WORDS = (
    "apple bird blue boat book bread cake camp card cat chair cloud coat cold corn cup dark desk dog door "
    "dream drum duck dust egg farm fish flag frog gate gift glass gold grass hand hat hill horse house ice "
    "jar key king lake lamp leaf lion map milk moon mouse nest night oak ocean owl paint park pear pen "
    "pig plate rain ring river road rock rose salt sand seed ship shoe silk sky snow sock song star stone "
    "sun table tent tiger toy train tree wall water whale wind wolf wood yard"
).split()
MODES = ("words", "letters")
WORDS_PROMPTS = [
    "Reverse the order of these words: {items}",
    "Write these words in reverse order: {items}",
    "List these words from last to first: {items}",
]
LETTERS_PROMPTS = [
    "Spell the word '{word}' backwards.",
    "Reverse the letters of the word '{word}'.",
    "Write '{word}' with its letters in reverse order.",
]
DEFAULT_N = {"train": 2000, "test": 200}
ANSWER_IS = re.compile(r"answer is\s*[:=]?\s*([^\n.]*)", re.IGNORECASE)  # up to the end of the sentence

__all__ = ["reversal", "extract_reversal_answer", "canonical"]


def canonical(text: str) -> str:
    """Lowercase words joined by ", " ("Seed,cold  River." -> "seed, cold, river")."""
    return ", ".join(re.findall(r"[a-z]+", text.lower()))


def extract_reversal_answer(text: str) -> str | None:
    """The words after the last "The answer is" up to the end of that sentence, else after
    the last ":" of the last non-empty line; None when nothing is left."""
    if not text:
        return None
    found = ANSWER_IS.findall(text)
    if found:
        candidate = found[-1]
    else:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        candidate = lines[-1].rsplit(":", 1)[-1] if lines else ""
    return canonical(candidate) or None


def _draw(rng: random.Random, mode: str, min_items: int, max_items: int) -> tuple[tuple, dict]:
    if mode == "letters":
        word = rng.choice([w for w in WORDS if min_items <= len(w) <= max_items])
        prompt = rng.choice(LETTERS_PROMPTS).format(word=word)
        answer, identity = word[::-1], (word,)
    else:
        items = rng.sample(WORDS, rng.randint(min_items, max_items))
        prompt = rng.choice(WORDS_PROMPTS).format(items=", ".join(items))
        answer, identity = ", ".join(reversed(items)), tuple(items)
    return (identity, prompt), {"prompt": prompt, "completion": f"The answer is {answer}.", "answer": answer}


def reversal(
    split: str = "train",
    *,
    n: int | None = None,
    mode: str = "words",
    min_items: int = 3,
    max_items: int = 5,
    seed: int = 0,
) -> list[dict]:
    """``n`` reversal problems of ``split`` (train: 2000, test: 200 by default).

    mode=words: reverse a list of ``min_items``..``max_items`` distinct words (the defaults give
    ~10^9 lists). mode=letters: spell one word of ``min_items``..``max_items`` letters backwards
    (only ~100 words: use n <= ~80 for train, <= ~15 for test). The split is decided by the words
    alone, never the wording of the question.
    """
    if mode not in MODES:
        raise DataError(f"builtin:reversal option mode={mode!r}: use one of {', '.join(MODES)} (data.options.mode)")
    check_int("reversal", "min_items", min_items, 1 if mode == "letters" else 2)
    check_int("reversal", "max_items", max_items, min_items)
    if mode == "words" and max_items > len(WORDS):
        raise DataError(
            f"builtin:reversal option max_items={max_items}: at most {len(WORDS)} words (data.options.max_items)"
        )
    if mode == "letters" and not any(min_items <= len(w) <= max_items for w in WORDS):
        raise DataError(
            f"builtin:reversal: no word has {min_items}..{max_items} letters (data.options.min_items / max_items)"
        )
    count = n if n is not None else DEFAULT_N.get(split, DEFAULT_N["test"])
    return sample_split(
        split,
        count,
        seed,
        lambda rng: _draw(rng, mode, min_items, max_items),
        name="reversal",
        identity=lambda key: key[0],
    )
