"""Step-labelled solutions of the multi-step arithmetic problems, for process rewards.

    polmctl run recipe=prm                     # data=arithmetic_steps: builtin:arithmetic_steps
    polmctl run recipe=step_dpo                # data=arithmetic_step_pairs: builtin:arithmetic_step_pairs

``arithmetic_steps``: rows in TRL's stepwise-supervision format (the format of its PRMTrainer
and of Math-Shepherd), one solution per problem of ``builtin:arithmetic`` (same train/test
partition, two operations by default):

    {"prompt": "Sam had 16 cookies and lost 10. Then 1 of them are taken away. How many ...",
     "completions": ["16 - 10 = 6.", "6 - 1 = 5.", "The answer is 5."],
     "labels": [true, true, true], "answer": "5"}

About half the solutions are correct; the others are corrupted at one step (a slip in a
result, the wrong operation, a wrong number carried from the step before, or a wrong final
answer) and go on consistently from the wrong value, as a model's solution would. The
labels are not written by construction: ``check_steps`` reads every step back and checks it
against the problem.

Label convention (Math-Shepherd's, and TRL's data): a step is labelled true while the
solution up to and including it is still right, so the labels are true up to the first
wrong step and false from it on, even where a later step's arithmetic is right in itself
("21 - 3 = 18." after the slip "12 + 7 = 21."). A step's label then says whether the
solution can still reach the right answer, which is what a PRM's per-step score is used as:
its minimum or product over the steps scores the whole solution, and the first step scored
false is the predicted first error.

``arithmetic_step_pairs``: Step-DPO pairs from the same corrupted solutions: the correct
steps before the first wrong one (``prefix``), then the correct step (``chosen``) against
the wrong one (``rejected``).
"""

from __future__ import annotations

import random
import re

from polmctl.data.builtin.arithmetic import APPLY, SHOWN, arithmetic
from polmctl.errors import DataError

OPERATOR = {shown: op for op, shown in SHOWN.items()}  # "x" -> "*"
EQUATION = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)\.")
ANSWER = re.compile(r"The answer is (\d+)\.")
SLIPS = (-3, -2, -1, 1, 2, 3, 10)

Operation = tuple[int, str, int, int]  # (left, op, right, result) of one step of the true solution


def _operation(found: re.Match) -> Operation:
    return int(found[1]), OPERATOR[found[2]], int(found[3]), int(found[4])


def operations(completion: str) -> list[Operation]:
    """The operations of a worked ``builtin:arithmetic`` completion ("12 + 7 = 19. 19 - 3 = 16. ...")."""
    return [_operation(found) for found in EQUATION.finditer(completion)]


def solution_steps(ops: list[Operation], answer: int) -> list[str]:
    """The steps of a solution: one equation per operation, then the answer."""
    return [f"{a} {SHOWN[op]} {b} = {r}." for a, op, b, r in ops] + [f"The answer is {answer}."]


def check_steps(ops: list[Operation], answer: int, steps: list[str]) -> list[bool]:
    """Each step's label: true while every step up to it is right. An equation step is right
    when it applies the problem's operation to the problem's number and the true running value
    (the first step: the problem's first number) and gets the result; the last step when it
    states the true answer."""
    labels, sound = [], len(steps) == len(ops) + 1
    for i, step in enumerate(steps):
        if i < len(ops):
            found = EQUATION.fullmatch(step)
            right = found is not None and _operation(found) == ops[i]
        else:
            found = ANSWER.fullmatch(step)
            right = found is not None and int(found[1]) == answer
        sound = sound and right
        labels.append(sound)
    return labels


def _wrong(value: int, rng: random.Random) -> int:
    """A value near ``value`` but not it, never negative."""
    wrong = value + rng.choice(SLIPS)
    return wrong if wrong >= 0 and wrong != value else value + 1


def _wrong_step(a: int, op: str, b: int, result: int, rng: random.Random, carried: bool) -> Operation:
    """A wrong version of the step ``a op b = result`` whose value is not ``result``: a slip in the
    result, the other operation (shown, and computed right), or (``carried``: a step after the
    first) a wrong number carried from the step before, computed right."""
    kind = rng.choice(["slip", "operation"] + (["carried"] if carried else []))
    if kind == "operation":
        other = {"+": "-", "-": "+", "*": "+"}[op]
        if 0 <= APPLY[other](a, b) != result:
            return a, other, b, APPLY[other](a, b)
    if kind == "carried":
        left = _wrong(a, rng)
        if 0 <= APPLY[op](left, b) != result:
            return left, op, b, APPLY[op](left, b)
    return a, op, b, _wrong(result, rng)


def _carry_on(value: int, later: list[Operation]) -> list[Operation] | None:
    """The later operations applied correctly to ``value``; None if one would go below zero."""
    done = []
    for _, op, b, _ in later:
        if APPLY[op](value, b) < 0:
            return None
        done.append((value, op, b, APPLY[op](value, b)))
        value = APPLY[op](value, b)
    return done


def corrupt(ops: list[Operation], answer: int, first_wrong: int, rng: random.Random) -> list[str]:
    """The solution with its first wrong step at index ``first_wrong`` (``len(ops)``: the answer
    step). The steps after it go on correctly from the wrong value; every later operation is
    one-to-one (+ c, - c, x c with c >= 2), so the final answer is wrong too."""
    if first_wrong == len(ops):
        return solution_steps(ops, _wrong(answer, rng))
    a, op, b, r = ops[first_wrong]
    step = _wrong_step(a, op, b, r, rng, carried=first_wrong > 0)
    later = _carry_on(step[3], ops[first_wrong + 1 :])
    if later is None:  # e.g. 5 - 7 after a slip downwards: slip upwards instead, which never goes negative
        step = (a, op, b, r + 10)
        later = _carry_on(r + 10, ops[first_wrong + 1 :])
    wrong_ops = [*ops[:first_wrong], step, *later]
    return solution_steps(wrong_ops, wrong_ops[-1][3])


def _problems(split: str, n, max_operand: int, ops: str, steps: int, seed: int) -> list[tuple[dict, list[Operation]]]:
    rows = arithmetic(split, n=n, max_operand=max_operand, ops=ops, steps=steps, seed=seed)
    return [(row, operations(row["completion"])) for row in rows]


def arithmetic_steps(
    split: str = "train",
    *,
    n: int | None = None,
    max_operand: int = 30,
    ops: str = "+-",
    steps: int = 2,
    correct_fraction: float = 0.5,
    seed: int = 0,
) -> list[dict]:
    """``n`` step-labelled solutions (train: 2000, test: 200 by default), one per problem: a
    ``correct_fraction`` of them correct, the others wrong from a step drawn uniformly."""
    number = isinstance(correct_fraction, (int, float)) and not isinstance(correct_fraction, bool)
    if not number or not 0 <= correct_fraction <= 1:
        raise DataError(
            f"builtin:arithmetic_steps option correct_fraction={correct_fraction!r}: use a number in [0, 1] "
            "(data.options.correct_fraction)"
        )
    rng = random.Random(f"arithmetic_steps:{split}:{seed}")
    out = []
    for row, problem in _problems(split, n, max_operand, ops, steps, seed):
        answer = int(row["answer"])
        if rng.random() < correct_fraction:
            solution = solution_steps(problem, answer)
        else:
            solution = corrupt(problem, answer, rng.randrange(len(problem) + 1), rng)
        labels = check_steps(problem, answer, solution)
        out.append({"prompt": row["prompt"], "completions": solution, "labels": labels, "answer": row["answer"]})
    return out


def arithmetic_step_pairs(
    split: str = "train",
    *,
    n: int | None = None,
    max_operand: int = 30,
    ops: str = "+-",
    steps: int = 2,
    separator: str = "\n",
    seed: int = 0,
) -> list[dict]:
    """``n`` Step-DPO pairs, one per problem: {prompt, prefix, chosen, rejected, answer}. ``prefix``
    is the correct steps before the first wrong one, each followed by ``separator`` ("" when the
    first step is the wrong one); ``chosen`` is the correct step there, ``rejected`` the wrong one."""
    if not isinstance(separator, str) or not separator:
        raise DataError(f"builtin:arithmetic_step_pairs option separator={separator!r}: use a non-empty string")
    rng = random.Random(f"arithmetic_step_pairs:{split}:{seed}")
    out = []
    for row, problem in _problems(split, n, max_operand, ops, steps, seed):
        answer = int(row["answer"])
        right = solution_steps(problem, answer)
        wrong = corrupt(problem, answer, rng.randrange(len(problem) + 1), rng)
        k = check_steps(problem, answer, wrong).index(False)
        out.append(
            {
                "prompt": row["prompt"],
                "prefix": "".join(step + separator for step in right[:k]),
                "chosen": right[k],
                "rejected": wrong[k],
                "answer": row["answer"],
            }
        )
    return out
