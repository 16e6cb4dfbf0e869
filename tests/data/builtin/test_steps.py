"""builtin:arithmetic_steps and builtin:arithmetic_step_pairs: every step re-checked here by
evaluating it (independently of the generator's checker), labels true up to the first wrong step
and false from it on, deterministic by seed, splits that never share a problem."""

from __future__ import annotations

import operator
import re
from collections import Counter

import pytest

from polmctl.data import load_rows
from polmctl.data.builtin.arithmetic import arithmetic
from polmctl.data.builtin.steps import arithmetic_step_pairs, arithmetic_steps, check_steps, operations
from polmctl.errors import DataError

pytestmark = pytest.mark.unit

OPS = {"+": operator.add, "-": operator.sub, "x": operator.mul}
STEP = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)\.")


def true_steps(reference_completion: str) -> list[str]:
    """The reference solution of builtin:arithmetic ("a + b = r. r - c = f. The answer is f.") as steps."""
    return [s if s.endswith(".") else s + "." for s in reference_completion.split(". ")]


def step_is_right(step: str, truth: str) -> bool:
    """A step is right if it is the reference step: the same numbers, the same operation, and (checked
    by evaluating it) a true equation; the answer step if it states the reference answer."""
    if truth.startswith("The answer is"):
        return step == truth
    ours, theirs = STEP.fullmatch(step), STEP.fullmatch(truth)
    assert theirs and OPS[theirs[2]](int(theirs[1]), int(theirs[3])) == int(theirs[4])
    if ours is None:
        return False
    evaluates = OPS[ours[2]](int(ours[1]), int(ours[3])) == int(ours[4])
    return evaluates and ours.groups() == theirs.groups()


@pytest.mark.parametrize("options", [{}, {"ops": "+-*"}, {"steps": 1}, {"ops": "*-", "max_operand": 12}])
def test_labels_are_true_up_to_the_first_wrong_step_and_false_from_it_on(options):
    rows = arithmetic_steps("train", n=400, **options)
    reference = arithmetic(
        "train", n=400, steps=options.get("steps", 2), **{k: v for k, v in options.items() if k != "steps"}
    )
    first_wrong = Counter()
    for row, ref in zip(rows, reference):
        assert row["prompt"] == ref["prompt"] and row["answer"] == ref["answer"]
        truth = true_steps(ref["completion"])
        assert len(row["completions"]) == len(row["labels"]) == len(truth)
        right = [step_is_right(s, t) for s, t in zip(row["completions"], truth)]
        k = right.index(False) if False in right else len(right)
        assert row["labels"] == [True] * k + [False] * (len(right) - k), row
        first_wrong[k] += 1
        if k < len(right):  # a wrong solution goes on from the wrong value and ends on a wrong answer
            assert row["completions"][-1] != truth[-1]
            for step in row["completions"][k + 1 : -1]:  # the later equations are true in themselves
                a, op, b, r = STEP.fullmatch(step).groups()
                assert OPS[op](int(a), int(b)) == int(r) >= 0
            equations = [STEP.fullmatch(s) for s in row["completions"][:-1]]
            for before, after in zip(equations[k:], equations[k + 1 :]):
                assert after[1] == before[4]  # after the error, each equation starts from the previous result
        else:
            assert row["completions"] == truth
    steps = len(truth)
    assert set(first_wrong) == set(range(steps + 1))  # every step is sometimes the first wrong one
    assert 0.4 < first_wrong[steps] / len(rows) < 0.6  # about half the solutions are correct


def test_every_kind_of_error_occurs():
    rows = [r for r in arithmetic_steps("train", n=600, ops="+-*") if not all(r["labels"])]
    reference = {r["prompt"]: true_steps(r["completion"]) for r in arithmetic("train", n=600, steps=2, ops="+-*")}
    kinds = Counter()
    for row in rows:
        k = row["labels"].index(False)
        step, truth = row["completions"][k], reference[row["prompt"]][k]
        ours, theirs = STEP.fullmatch(step), STEP.fullmatch(truth)
        if ours is None:
            kinds["answer"] += 1
        elif ours[2] != theirs[2]:
            kinds["operation"] += 1
        elif ours[1] != theirs[1]:
            kinds["carried"] += 1
        else:
            assert ours[4] != theirs[4] and ours[3] == theirs[3]
            kinds["slip"] += 1
    assert set(kinds) == {"answer", "operation", "carried", "slip"}, kinds


def test_the_generators_checker_agrees_and_rejects_malformed_steps():
    ops = operations("12 + 7 = 19. 19 - 3 = 16. The answer is 16.")
    assert ops == [(12, "+", 7, 19), (19, "-", 3, 16)]
    assert check_steps(ops, 16, ["12 + 7 = 19.", "19 - 3 = 16.", "The answer is 16."]) == [True, True, True]
    assert check_steps(ops, 16, ["12 + 7 = 19.", "19 - 3 = 17.", "The answer is 16."]) == [True, False, False]
    assert check_steps(ops, 16, ["12 + 7 = 19.", "20 - 3 = 17.", "The answer is 17."]) == [True, False, False]
    assert check_steps(ops, 16, ["12 - 7 = 5.", "5 - 3 = 2.", "The answer is 2."]) == [False, False, False]
    assert check_steps(ops, 16, ["12 + 7 = 19.", "19 - 3 = 16.", "It is 16."]) == [True, True, False]
    assert check_steps(ops, 16, ["12 + 7 = 19.", "The answer is 16."]) == [False, False]  # a step missing


def test_rows_are_fixed_by_seed_and_the_splits_never_share_a_problem():
    assert arithmetic_steps("train", n=50) == arithmetic_steps("train", n=50, seed=0)
    assert arithmetic_steps("train", n=50) != arithmetic_steps("train", n=50, seed=1)
    problems = {}
    for split in ("train", "test"):
        rows, reference = arithmetic_steps(split, n=150), arithmetic(split, n=150, steps=2)
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in reference]
        problems[split] = {tuple(operations(r["completion"])) for r in reference}
    assert not problems["train"] & problems["test"]
    assert load_rows("builtin:arithmetic_steps", "test", max_rows=3) == arithmetic_steps("test")[:3]


def test_correct_fraction_option():
    assert all(all(r["labels"]) for r in arithmetic_steps("train", n=50, correct_fraction=1))
    assert not any(all(r["labels"]) for r in arithmetic_steps("train", n=50, correct_fraction=0))
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(DataError, match=r"correct_fraction=.*data.options.correct_fraction"):
            arithmetic_steps("train", n=5, correct_fraction=bad)
    with pytest.raises(DataError, match="has no option 'fraction'.*correct_fraction"):
        load_rows("builtin:arithmetic_steps", options={"fraction": 0.5})


def test_step_pairs_share_the_correct_prefix_and_differ_at_the_first_wrong_step():
    rows = arithmetic_step_pairs("train", n=300)
    reference = arithmetic("train", n=300, steps=2)
    where = Counter()
    for pair, ref in zip(rows, reference):
        truth = true_steps(ref["completion"])
        prefix = pair["prefix"].split("\n")[:-1] if pair["prefix"] else []
        assert pair["prefix"] == "".join(s + "\n" for s in prefix)
        k = len(prefix)
        assert prefix == truth[:k]  # the shared steps are the correct ones
        assert pair["chosen"] == truth[k] and step_is_right(pair["chosen"], truth[k])
        assert not step_is_right(pair["rejected"], truth[k]) and pair["rejected"] != pair["chosen"]
        where[k] += 1
    assert set(where) == {0, 1, 2}
    spaced = [p for p in arithmetic_step_pairs("train", n=40, separator="\n\n") if p["prefix"]]
    assert spaced and all(p["prefix"].endswith(".\n\n") for p in spaced)
    with pytest.raises(DataError, match="separator=''"):
        arithmetic_step_pairs("train", n=5, separator="")
