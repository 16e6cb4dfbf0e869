"""builtin:reversal: deterministic by seed, disjoint splits, correct answers, answer extraction,
and the ``reversal`` eval task's exact match (generation stubbed: only the scoring is under test)."""

from __future__ import annotations

import re

import pytest

from polmctl.config.schema import EvalConfig
from polmctl.data import load_rows
from polmctl.data.builtin.reversal import WORDS, canonical, extract_reversal_answer, reversal
from polmctl.errors import DataError
from polmctl.evals import EVAL_TASKS

pytestmark = pytest.mark.unit


def test_rows_are_fixed_by_seed_and_the_splits_never_share_a_word_list():
    assert reversal("train", n=30) == reversal("train", n=30, seed=0) != reversal("train", n=30, seed=1)
    assert reversal("test", n=1)[0] == {
        "prompt": "List these words from last to first: pen, cat, shoe",
        "completion": "The answer is shoe, cat, pen.",
        "answer": "shoe, cat, pen",
    }
    lists = {split: {row["answer"] for row in reversal(split, n=300)} for split in ("train", "test")}
    assert not lists["train"] & lists["test"]


def test_words_answers_reverse_the_prompt_and_read_back_exactly():
    for row in reversal("train", n=200, min_items=2, max_items=6):
        items = row["prompt"].split(": ", 1)[1].split(", ")
        assert 2 <= len(items) <= 6 and len(set(items)) == len(items) and set(items) <= set(WORDS)
        assert row["answer"] == ", ".join(reversed(items))
        assert extract_reversal_answer(row["completion"]) == row["answer"]


def test_letters_mode_spells_one_word_backwards():
    rows = reversal("train", n=40, mode="letters", min_items=4, max_items=5)
    for row in rows:
        word = re.search(r"'(\w+)'", row["prompt"])[1]
        assert 4 <= len(word) <= 5 and row["answer"] == word[::-1]
        assert extract_reversal_answer(row["completion"]) == row["answer"]
    with pytest.raises(DataError, match="only .* distinct test rows"):
        reversal("test", n=100, mode="letters")  # ~100 words, 15% of them held out


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is seed, cold, river.", "seed, cold, river"),
        ("The answer is: **Seed,Cold  river**. Then more text", "seed, cold, river"),
        ("First the answer is a, b. No wait, the answer is c, d.", "c, d"),
        ("The words in reverse order are: hat, dog", "hat, dog"),
        ("Here:\n\n- Dream\n- Frog", "frog"),
        ("", None),
        ("...", None),
    ],
)
def test_extract_reversal_answer(text, expected):
    assert extract_reversal_answer(text) == expected


def test_canonical_form():
    assert canonical("  Pear ,LAMP.  ") == "pear, lamp"


@pytest.mark.parametrize(
    "options,key",
    [
        ({"mode": "sentences"}, "mode"),
        ({"min_items": 1}, "min_items"),
        ({"min_items": 4, "max_items": 3}, "max_items"),
        ({"max_items": 1000}, "max_items"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_options_name_the_data_option(options, key):
    with pytest.raises(DataError, match=f"data.options.{key}"):
        load_rows("builtin:reversal", options=options)


def test_the_reversal_eval_task_scores_exact_matches(monkeypatch):
    from polmctl.evals import arithmetic as em

    rows = reversal("test", n=4)
    answers = iter([rows[0]["completion"], "The answer is wrong.", rows[2]["answer"].upper(), ""])
    monkeypatch.setattr(em, "format_prompt", lambda prompt, tokenizer: prompt)
    monkeypatch.setattr(em, "generate", lambda model, tok, prompts, **kw: [next(answers) for _ in prompts])
    assert EVAL_TASKS["reversal"][0] == "builtin:reversal"
    result = EVAL_TASKS["reversal"][1](None, None, rows, EvalConfig(tasks=["reversal"]))
    assert result["metrics"] == {"accuracy": 0.5, "n": 4}
    assert [s["correct"] for s in result["samples"]] == [True, False, True, False]
