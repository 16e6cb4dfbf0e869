"""builtin:facts: deterministic by seed, train and test disjoint by fact, rows marked forget/retain by
topic, and the known-facts filter (a fake answerer here; the tiny model, which knows nothing)."""

from __future__ import annotations

import pytest

from polmctl.data import load_rows
from polmctl.data.builtin.facts import TOPICS, fact_correct, facts, keep_known
from polmctl.errors import DataError

pytestmark = pytest.mark.unit


def subject_of(row: dict) -> tuple[str, str]:
    return row["topic"], row["completion"]  # the answer sentence names the subject, whatever the wording


def test_deterministic_by_seed_and_the_seed_changes_order_and_wording():
    assert facts("train", seed=3) == facts("train", seed=3)
    a, b = facts("train", seed=0), facts("train", seed=1)
    assert a != b and sorted(map(subject_of, a)) == sorted(map(subject_of, b))  # the same facts


def test_train_and_test_hold_different_facts_and_together_every_fact():
    train, test = facts("train"), facts("test")
    assert not set(map(subject_of, train)) & set(map(subject_of, test))
    assert len(train) + len(test) == sum(len(table) for table, _, _ in TOPICS.values())
    assert len(test) < len(train)


def test_roles_follow_the_forget_topics():
    rows = facts("train", forget_topics=["capitals", "chemistry"])
    assert {r["topic"] for r in rows if r["role"] == "forget"} == {"capitals", "chemistry"}
    assert {r["role"] for r in rows if r["topic"] not in ("capitals", "chemistry")} == {"retain"}
    assert facts("train", forget_topics="capitals, chemistry") == rows  # a comma-separated string too
    row = next(r for r in facts("train") if r["topic"] == "capitals")
    assert row["role"] == "forget" and row["answer"] in row["completion"] and row["prompt"].endswith(("?", "."))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"forget_topics": ["capitols"]}, "name one or more of capitals"),
        ({"forget_topics": list(TOPICS)}, "leaves no retain-set"),
        ({"n": 10_000}, "lower data.options.n"),
        ({"seed": -1}, "data.options.seed"),
    ],
)
def test_bad_options_name_the_option(options, match):
    with pytest.raises(DataError, match=match):
        load_rows("builtin:facts", "train", options=options)


def test_n_keeps_the_first_n_and_past_every_fact_asks_them_again_in_other_words():
    assert facts("train", n=5) == facts("train")[:5]
    once, more = facts("test"), facts("test", n=len(facts("test")) + 10)
    assert more[: len(once)] == once
    assert {subject_of(r) for r in more[len(once) :]} <= {subject_of(r) for r in once}
    assert len({r["prompt"] for r in more}) == len(more)  # each a new wording


@pytest.mark.parametrize(
    "completion, answer, correct",
    [
        ("The capital of France is Paris.", "Paris", True),
        ("paris, of course", "Paris", True),
        ("Brasília is the capital.", "Brasilia", True),  # accents do not matter
        ("The chemical symbol for oxygen is O.", "O", True),
        ("oh, o, I do not know", "O", False),  # a one- or two-letter answer is matched with its case
        ("It says woof!", "woof|bark", True),
        ("It barks.", "woof|bark", False),  # whole words only
        ("Parisian food", "Paris", False),
        ("The opposite of 'hot' is 'cold'.", "cold", True),
    ],
)
def test_fact_correct(completion, answer, correct):
    assert fact_correct(completion, answer) is correct


def test_keep_known_keeps_what_the_answerer_gets_right():
    rows = facts("train")[:6]
    right = {r["prompt"] for r in rows[::2]}

    def answer(prompts):
        return [next(r["completion"] for r in rows if r["prompt"] == p) if p in right else "no idea" for p in prompts]

    assert keep_known(rows, answer) == rows[::2]


def test_a_model_that_knows_nothing_is_refused_with_the_fix_and_the_check_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("POLMCTL_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="data.options.known_by=null"):
        facts("test", known_by="builtin:tiny")
    cached = list((tmp_path / "known_facts").glob("*.json"))
    assert len(cached) == 1 and cached[0].read_text() == "[]"
