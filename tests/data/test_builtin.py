"""Builtin generators: deterministic by seed, disjoint splits, correct answers; answer extraction."""

from __future__ import annotations

import re

import pytest

from polmctl.data import BUILTIN_SOURCES, extract_answer
from polmctl.data.builtin.split import split_of
from polmctl.errors import DataError

pytestmark = pytest.mark.unit


def gen(name: str, split: str = "train", **options) -> list[dict]:
    return BUILTIN_SOURCES[name](split, **options)


def prompt_text(row: dict) -> str:
    """The user-visible question of a row, whatever its format."""
    if "prompt" in row:
        return row["prompt"]
    if "messages" in row:
        return row["messages"][0]["content"]
    return row["text"]


@pytest.mark.parametrize("name", list(BUILTIN_SOURCES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_same_seed_same_rows_other_seed_other_rows(name, split):
    rows = gen(name, split, n=40)
    assert len(rows) == 40
    assert rows == gen(name, split, n=40, seed=0)
    assert rows != gen(name, split, n=40, seed=1)


def test_rows_are_stable_across_processes_and_versions():
    # A fixed expectation: if the generator or the split hash changed (e.g. to Python's
    # salted hash()), the held-out set of earlier runs would silently change.
    assert [a for a in range(1, 40) if split_of(("arithmetic", (a, "+", 1))) == "test"] == [12, 13, 22, 23, 25, 29]
    assert gen("arithmetic", n=1)[0] == {
        "prompt": "Ava collected 18 marbles on Monday and 5 marbles on Tuesday. "
        "How many marbles did Ava collect in all?",
        "completion": "18 + 5 = 23. The answer is 23.",
        "answer": "23",
    }


@pytest.mark.parametrize(
    "name,options",
    [
        ("arithmetic", {}),
        ("arithmetic", {"ops": "+-*", "steps": 2, "max_operand": 9}),
        ("instructions", {}),
        ("domain_text", {}),
    ],
)
def test_no_test_prompt_occurs_in_train(name, options):
    train = {prompt_text(r) for r in gen(name, "train", **options)}
    test = [prompt_text(r) for r in gen(name, "test", **options)]
    assert len(test) == len(set(test)) > 50
    assert not train.intersection(test)


def test_arithmetic_test_problems_are_never_trained_on_in_other_words():
    problem = lambda row: row["completion"].split(" The answer")[0]  # e.g. "10 + 2 = 12."  # noqa: E731
    train = {problem(r) for r in gen("arithmetic", "train")}
    test = {problem(r) for r in gen("arithmetic", "test")}
    assert len(test) > 50 and not train & test


def test_an_evaluation_set_asks_mostly_different_problems():
    problems = [r["completion"] for r in gen("arithmetic", "test", n=100)]
    assert len(set(problems)) >= 95  # a problem repeats in other words only once fresh ones run out


def test_domain_text_test_plants_never_appear_in_training():
    plant = lambda row: row["text"].split()[1]  # every document starts "The <plant> grows ..."  # noqa: E731
    train = {plant(r) for r in gen("domain_text", "train")}
    test = {plant(r) for r in gen("domain_text", "test")}
    assert test and not train & test


def test_default_sizes():
    sizes = {name: (len(gen(name, "train")), len(gen(name, "test"))) for name in BUILTIN_SOURCES}
    assert sizes == {
        "arithmetic": (2000, 200),
        "instructions": (1000, 100),
        "domain_text": (500, 100),
        "arithmetic_preference": (2000, 200),
        "style_preference": (1000, 100),
        "arithmetic_feedback": (2000, 200),
        "reversal": (2000, 200),
        "shapes": (2000, 200),
        "facts": (159, 26),  # every fact once, one wording each
        "arithmetic_steps": (2000, 200),
        "arithmetic_step_pairs": (2000, 200),
    }


WORK = re.compile(r"^(\d+) ([-+x]) (\d+) = (\d+)\.$")
SYMBOL = {"+": "+", "-": "-", "x": "*"}


@pytest.mark.parametrize("options", [{}, {"ops": "+-*", "steps": 2, "max_operand": 50}, {"ops": "-", "steps": 2}])
def test_arithmetic_answers_are_correct(options):
    ops = options.get("ops", "+-")
    for row in gen("arithmetic", n=300, **options):
        work, tail = row["completion"].split(" The answer is ")
        steps = [WORK.match(s) for s in re.split(r"(?<=\.) ", work)]
        assert all(steps) and len(steps) == options.get("steps", 1), row
        previous = None
        for step in steps:
            a, op, b, result = step.groups()
            assert SYMBOL[op] in ops
            assert eval(f"{a} {SYMBOL[op]} {b}") == int(result) >= 0, row  # never negative
            assert previous is None or a == previous, row  # the second step continues the first
            previous = result
        first_a, first_b = steps[0].group(1), steps[0].group(3)
        assert re.findall(r"\d+", row["prompt"])[:2] == [first_a, first_b], row
        assert int(first_a) <= options.get("max_operand", 30)
        assert tail == f"{row['answer']}." and row["answer"] == result
        assert extract_answer(row["completion"]) == row["answer"]


def test_arithmetic_uses_only_the_requested_operators():
    rows = gen("arithmetic", n=100, ops="*")
    assert all(" x " in r["completion"] and " + " not in r["completion"] for r in rows)


def _verify_instruction(question: str, answer: str) -> None:
    quoted = re.findall(r"'([^']+)'", question)
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    if re.search(r"[Rr]everse|backwards", question):
        assert answer == quoted[0][::-1]
    elif re.search(r"capital|uppercase|Uppercase", question):
        phrase = quoted[0] if quoted else question.split(": ", 1)[1]
        assert answer == phrase.upper()
    elif re.search(r"letters|length", question):
        assert answer == str(len(quoted[0]))
    elif re.search(r"alphabetical|A to Z", question):
        words = re.search(r"(?::|Arrange) (.+?)(?:\.| from A to Z\.)$", question).group(1).split(", ")
        assert answer == ", ".join(sorted(words))
    elif re.search(r"larger|bigger|greater", question):
        assert answer == str(max(numbers))
    else:
        factors = {"km": 1000, "kg": 1000, "m": 100, "hours": 60, "minutes": 60, "days": 24}
        unit = re.search(r"\d+ (\w+)", question).group(1)
        assert answer == str(numbers[0] * factors[unit]), question


def test_instruction_answers_are_correct_and_in_the_reply():
    rows = gen("instructions", n=300)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert row["answer"] in assistant["content"]
        _verify_instruction(user["content"], row["answer"])
    assert len({r["messages"][0]["content"].split()[0] for r in rows}) >= 10  # varied phrasings


def test_domain_text_documents_have_three_to_six_sentences():
    for row in gen("domain_text", n=100):
        sentences = [s for s in row["text"].split(". ") if s]
        assert set(row) == {"text"} and 3 <= len(sentences) <= 6, row["text"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("12 + 7 = 19. The answer is 19.", "19"),
        ("The answer is 19.0", "19"),
        ("the answer is: 1,200 coins", "1200"),
        ("The answer is **42**.", "42"),
        ("The answer is \\boxed{8}", "8"),
        ("The answer is 12,", "12"),
        ("The answer is 7.50", "7.5"),
        ("The answer is -4.", "-4"),
        ("I got 7. The answer is 9 apples, not 7", "9"),
        ("The answer is 2. No wait, the answer is 3", "3"),
        ("first 3 then 5, so 8", "8"),
        ("10 - 4 = 6", "6"),
        ("counting 1,2,3", "3"),
        ("Mia has 19.", "19"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "options,message",
    [
        ({"ops": "/"}, r"ops='/'.*subset of '\+-\*'"),
        ({"ops": ""}, "non-empty subset"),
        ({"steps": 3}, "steps=3: use 1 or 2"),
        ({"max_operand": 1}, "max_operand=1: use an integer >= 2"),
        ({"n": 0}, "n=0: use an integer >= 1"),
        ({"n": "ten"}, "n='ten'"),
        ({"seed": -1}, "seed=-1"),
        ({"max_operand": 2, "ops": "+", "n": 5000}, "only .* distinct train rows exist"),
    ],
)
def test_bad_arithmetic_options_are_named(options, message):
    with pytest.raises(DataError, match=message):
        gen("arithmetic", **options)


def test_unknown_split_lists_the_splits():
    with pytest.raises(DataError, match="builtin:instructions has splits train, test, not 'validation'"):
        gen("instructions", "validation")
