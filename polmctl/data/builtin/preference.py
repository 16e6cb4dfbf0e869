"""Builtin preference pairs with a ground truth a person can check.

    polmctl run recipe=dpo data.source=builtin:arithmetic_preference
    polmctl run recipe=reward_model data.source=builtin:style_preference

``arithmetic_preference``: the arithmetic problems of ``builtin:arithmetic`` (same
train/test partition), chosen = the correct worked answer, rejected = a plausible wrong
one (an arithmetic slip in the result, or the wrong operation).

``arithmetic_feedback``: the same problems as unpaired rows {prompt, completion, label}
for KTO, half with the right answer (true) and half with a wrong one (false).

``style_preference``: the questions of ``builtin:instructions``; both answers are right,
chosen is concise, rejected wraps the same answer in filler. A reward model trained on it
should prefer concise answers on held-out pairs.
"""

from __future__ import annotations

import random

from polmctl.data.builtin.arithmetic import APPLY, SHOWN, arithmetic
from polmctl.data.builtin.instructions import instructions

OPENERS = [
    "Great question! Let me think about this carefully before I answer.",
    "Sure, I would be happy to help you with that, it is an interesting one.",
    "Well, there are many ways to look at this, so let me walk through it slowly.",
    "Thanks for asking! This is the kind of question I really enjoy working on.",
]
CLOSERS = [
    "I hope this helps, and let me know if you have any other questions!",
    "Feel free to ask again if anything about this is unclear to you.",
    "That is my answer, although of course you should double-check it yourself.",
    "Please tell me if you would like me to explain any part of this in more detail.",
]


def _wrong_completion(row: dict, rng: random.Random) -> str:
    """The same working with a slip: a result off by a little, or the other operation."""
    first = row["completion"].split(". ")[0]  # "12 + 7 = 19" (the first step)
    lhs, result = first.split(" = ")
    a, shown, b = lhs.split(" ")
    op = next(o for o, s in SHOWN.items() if s == shown)
    right = int(row["answer"])
    if rng.random() < 0.5 and op in "+-":
        other = "-" if op == "+" else "+"
        wrong = APPLY[other](int(a), int(b))
        if wrong >= 0 and wrong != right and row["completion"].count("=") == 1:
            return f"{a} {SHOWN[other]} {b} = {wrong}. The answer is {wrong}."
    wrong = right + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    wrong = wrong if wrong >= 0 and wrong != right else right + 1
    return row["completion"].replace(f"{right}.", f"{wrong}.").replace(f"is {right}", f"is {wrong}")


def arithmetic_preference(
    split: str = "train", *, n: int | None = None, max_operand: int = 30, ops: str = "+-", steps: int = 1, seed: int = 0
) -> list[dict]:
    rows = arithmetic(split, n=n, max_operand=max_operand, ops=ops, steps=steps, seed=seed)
    rng = random.Random(f"arithmetic_preference:{split}:{seed}")
    return [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": _wrong_completion(r, rng), "answer": r["answer"]}
        for r in rows
    ]


def style_preference(split: str = "train", *, n: int | None = None, seed: int = 0) -> list[dict]:
    rows = instructions(split, n=n, seed=seed)
    rng = random.Random(f"style_preference:{split}:{seed}")
    pairs = []
    for r in rows:
        answer = r["messages"][-1]["content"]
        rambling = f"{rng.choice(OPENERS)} {answer} {rng.choice(CLOSERS)}"
        pairs.append({"prompt": r["messages"][0]["content"], "chosen": answer, "rejected": rambling})
    return pairs


def arithmetic_feedback(
    split: str = "train", *, n: int | None = None, max_operand: int = 30, ops: str = "+-", steps: int = 1, seed: int = 0
) -> list[dict]:
    """Unpaired rows for KTO: each problem with either its right answer (label true) or a
    wrong one (label false), chosen at random, so no prompt appears twice."""
    rng = random.Random(f"arithmetic_feedback:{split}:{seed}")
    rows = []
    for pair in arithmetic_preference(split, n=n, max_operand=max_operand, ops=ops, steps=steps, seed=seed):
        good = rng.random() < 0.5
        rows.append(
            {
                "prompt": pair["prompt"],
                "completion": pair["chosen" if good else "rejected"],
                "label": good,
                "answer": pair["answer"],
            }
        )
    return rows
