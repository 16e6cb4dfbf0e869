"""Preference data: builtin pairs with a ground truth, encoding, bad-row handling, collation."""

from __future__ import annotations

import pytest

from polmctl.data import extract_answer, format_prompt, load_rows
from polmctl.data.preference import encode_preference_dataset, preference_collate
from polmctl.errors import DataError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("options", [{}, {"steps": 2, "ops": "+-*"}])
def test_arithmetic_preference_prefers_the_right_answer(options):
    rows = load_rows("builtin:arithmetic_preference", "train", options={"n": 400, **options})
    for row in rows:
        assert extract_answer(row["chosen"]) == row["answer"] != extract_answer(row["rejected"])
        assert int(extract_answer(row["rejected"])) >= 0


def test_arithmetic_preference_keeps_the_arithmetic_partition():
    train = {r["prompt"] for r in load_rows("builtin:arithmetic", "train")}
    test = [r["prompt"] for r in load_rows("builtin:arithmetic_preference", "test")]
    assert test and not train.intersection(test)


def test_style_preference_pairs_are_both_right_and_differ_in_length():
    for row in load_rows("builtin:style_preference", "test"):
        assert row["chosen"] in row["rejected"] and len(row["rejected"]) > len(row["chosen"]) + 40


def test_pairs_encode_with_one_shared_prompt(tiny_tokenizer):
    rows = load_rows("builtin:arithmetic_preference", max_rows=3)
    examples, stats = encode_preference_dataset(rows, tiny_tokenizer, source="s")
    assert stats.kept == 3
    prompt_ids = tiny_tokenizer(format_prompt(rows[0]["prompt"], tiny_tokenizer), add_special_tokens=False)["input_ids"]
    assert examples[0]["prompt_ids"] == prompt_ids
    assert tiny_tokenizer.decode(examples[0]["chosen_ids"]) == rows[0]["chosen"] + "<|im_end|>\n"


def test_bad_pairs_are_counted_reported_and_skipped(tiny_tokenizer):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "q" * 300, "chosen": "a", "rejected": "b"},
    ]
    examples, stats = encode_preference_dataset(rows, tiny_tokenizer, source="s", max_length=64)
    assert len(examples) == 1 and (stats.identical, stats.empty, stats.too_long) == (1, 1, 1)
    assert "first: row 1" in stats.summary()
    with pytest.raises(DataError, match="row 1: chosen equals rejected"):
        encode_preference_dataset(rows, tiny_tokenizer, source="s", max_length=64, bad_rows="error")


def test_answers_are_truncated_to_fit_or_rejected(tiny_tokenizer):
    rows = [{"prompt": "p", "chosen": "a" * 100, "rejected": "b"}]
    examples, stats = encode_preference_dataset(rows, tiny_tokenizer, source="s", max_length=40)
    prompt = len(examples[0]["prompt_ids"])
    assert prompt + len(examples[0]["chosen_ids"]) == 40 and stats.truncated == 1
    with pytest.raises(DataError, match="longer than data.max_length=40"):
        encode_preference_dataset(rows, tiny_tokenizer, source="s", max_length=40, overlong="error")


def test_unpaired_rows_and_labels(tiny_tokenizer):
    rows = [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b", "label": "false"}]
    examples, _ = encode_preference_dataset(rows, tiny_tokenizer, source="s")
    assert [e["label"] for e in examples] == [True, False]
    with pytest.raises(DataError, match="row 0, column 'label': expected true or false"):
        encode_preference_dataset([{"prompt": "p", "completion": "a", "label": "maybe"}], tiny_tokenizer, source="s")


def test_sft_rows_are_not_preference_rows(tiny_tokenizer):
    with pytest.raises(DataError, match="needs .prompt, chosen, rejected."):
        encode_preference_dataset([{"prompt": "p", "completion": "c"}], tiny_tokenizer, source="s")


def test_collate_puts_chosen_then_rejected_with_answer_labels():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]},
    ]
    batch = preference_collate(examples, pad_token_id=0)
    assert batch["input_ids"].shape == (4, 4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 8, 0], [1, 2, 4, 5], [6, 9, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, 3, -100],
        [-100, 7, 8, -100],
        [-100, -100, 4, 5],
        [-100, 9, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_arithmetic_feedback_labels_match_the_answers():
    rows = load_rows("builtin:arithmetic_feedback", "train", options={"n": 300})
    assert 0.3 < sum(r["label"] for r in rows) / len(rows) < 0.7
    for row in rows:
        assert (extract_answer(row["completion"]) == row["answer"]) == row["label"]


def test_cut_answers_are_counted_apart_and_warn(tiny_tokenizer, capsys):
    """Preference pairs of worked solutions: chosen and rejected each count as an answer."""
    rows = [
        {
            "prompt": f"Compute ${i} \\cdot 12$.",
            "chosen": f"We have ${i} \\cdot 12 = {i} \\cdot 10 + {i} \\cdot 2 = {10 * i} + {2 * i}$. " * 3
            + f"The answer is {12 * i}.",
            "rejected": f"The answer is {12 * i + 1}.",
        }
        for i in range(1, 11)
    ]
    _, stats = encode_preference_dataset(rows, tiny_tokenizer, source="prefs.jsonl", max_length=120)
    assert (stats.answers, stats.answers_cut, stats.truncated) == (20, 10, 10)  # every chosen, no rejected
    keep = stats.whole_length()
    assert keep == max(stats.lengths)  # 10 rows: 95% of them is all of them
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: 10 of 20 prefs.jsonl answers (50%) are longer than data.max_length=120" in err
    assert f"data.max_length={keep} keeps 95% of rows whole" in err
    _, whole = encode_preference_dataset(rows, tiny_tokenizer, source="prefs.jsonl", max_length=keep)
    assert whole.answers_cut == 0 and capsys.readouterr().err == ""
