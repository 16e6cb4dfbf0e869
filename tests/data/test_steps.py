"""polmctl/data/steps.py: step-labelled rows put a label on each step's separator token and
nowhere else (TRL PRMTrainer.tokenize_row's worked example), truncation and bad rows, and
Step-DPO pairs whose prefix goes with the prompt."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from polmctl.data.formats import format_prompt
from polmctl.data.steps import encode_step_pairs, encode_step_rows, encode_steps
from polmctl.errors import DataError
from polmctl.losses import IGNORE_INDEX
from polmctl.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.unit

IGNORE = IGNORE_INDEX


@pytest.fixture(scope="module")
def words():
    """The word-level toy tokenizer of TRL's worked example ("\\n" is id 99), without a chat template or BOS."""
    vocab = {"<pad>": 0, "<unk>": 2, "2+2": 10, "?": 11, "a": 12, "b": 13, "c": 14, "\n": 99}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def encode(tokenizer, rows, **kwargs):
    return encode_step_rows(rows, tokenizer, source="rows.jsonl", **{"separator": "\n", **kwargs})


def test_trl_worked_example_labels_each_steps_separator(words):
    # TRL: input_ids [1, 10, 11, 12, 13, 99, 14, 99], labels [-100]*5 + [1, -100, 0], with BOS (id 1) first;
    # polmctl renders the prompt with format_prompt and adds no BOS, so the same without it.
    row = {"prompt": "2+2 ?", "completions": ["a b", "c"], "labels": [True, False]}
    (example,), stats = encode(words, [row])
    assert example["input_ids"] == [10, 11, 12, 13, 99, 14, 99]
    assert example["labels"] == [IGNORE] * 4 + [1, IGNORE, 0]
    assert (stats.kept, stats.steps, stats.correct) == (1, 2, 1)
    (example,), _ = encode(words, [row], last_step_only=True)  # TRL's train_on_last_step_only
    assert example["labels"] == [IGNORE] * 6 + [0]


def test_labels_sit_only_on_the_separator_after_each_step(tiny):
    steps = ["12 + 7 = 19.", "19 - 3 = 16.", "The answer is 17."]
    row = {"prompt": "Sam has 12 ...", "completions": steps, "labels": [True, True, False]}
    for separator in ("\n", "\n\n", " ки "):
        (example,), _ = encode(tiny, [row], separator=separator)
        ids, labels = example["input_ids"], example["labels"]
        labelled = [i for i, v in enumerate(labels) if v != IGNORE]
        assert [labels[i] for i in labelled] == [1, 1, 0]
        sep_ids = tiny(separator, add_special_tokens=False)["input_ids"]
        for n, i in enumerate(labelled):
            # The text up to a label is the prompt and the steps so far, each followed by the separator,
            # and the labelled token is the separator's last one.
            expected = format_prompt(row["prompt"], tiny) + "".join(s + separator for s in steps[: n + 1])
            assert tiny.decode(ids[: i + 1]) == expected
            assert ids[i] == sep_ids[-1] and ids[i + 1 - len(sep_ids) : i + 1] == sep_ids
        assert len(ids) == len(labels) == labelled[-1] + 1


def test_encode_steps_matches_the_rows_encoding(tiny):
    sep = tiny("\n", add_special_tokens=False)["input_ids"]
    ids, ends = encode_steps("q", ["a", "bb"], tiny, sep)
    (example,), _ = encode(tiny, [{"prompt": "q", "completions": ["a", "bb"], "labels": [True, True]}])
    assert ids == example["input_ids"] and ends == [i for i, v in enumerate(example["labels"]) if v != IGNORE]


def test_long_rows_are_cut_from_the_right_dropped_or_refused(tiny):
    row = {"prompt": "q", "completions": ["a" * 10, "b" * 10, "c" * 10], "labels": [True, True, False]}
    (full,), _ = encode(tiny, [row])
    first_end, second_end = [i for i, v in enumerate(full["labels"]) if v != IGNORE][:2]
    (cut,), stats = encode(tiny, [row], max_length=second_end + 3)
    assert cut["input_ids"] == full["input_ids"][: second_end + 3]
    assert [v for v in cut["labels"] if v != IGNORE] == [1, 1] and stats.truncated == 1 and stats.steps == 2
    with pytest.raises(DataError, match=r"no usable step-labelled row \(0/1 rows.*1 too long \(first: row 0\)"):
        encode(tiny, [row], max_length=first_end)  # the first label is the first token cut
    examples, stats = encode(
        tiny, [row, {**row, "completions": ["a", "b", "c"]}], max_length=second_end, overlong="drop"
    )
    assert len(examples) == 1 and examples[0]["row"] == 1 and stats.too_long == 1
    with pytest.raises(DataError, match=r"rows.jsonl: row 0 has \d+ tokens, more than data.max_length=20"):
        encode(tiny, [row], max_length=20, overlong="error")


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "q", "completions": ["a"]}, "rows.jsonl: row 1: column 'labels' is missing; .*TRL's PRM format"),
        ({"prompt": "q", "completion": "a", "labels": [True]}, "column 'completions' is missing"),
        (
            {"prompt": "q", "completions": "a\nb", "labels": [True]},
            "column 'completions': expected a list of step texts",
        ),
        ({"prompt": "q", "completions": ["a", 3], "labels": [True, True]}, "expected a list of step texts"),
        ({"prompt": "q", "completions": ["a"], "labels": ["yes"]}, "column 'labels': expected a list of true/false"),
        ({"prompt": "q", "completions": ["a", "b"], "labels": [True]}, "rows.jsonl: row 1: 2 steps but 1 labels"),
    ],
)
def test_malformed_rows_are_refused_naming_the_row(tiny, row, message):
    good = {"prompt": "q", "completions": ["a"], "labels": [True]}
    with pytest.raises(DataError, match=message):
        encode(tiny, [good, row])


def test_empty_rows_are_skipped_or_refused_and_the_separator_must_give_a_token(tiny):
    rows = [{"prompt": "q", "completions": [], "labels": []}, {"prompt": "q", "completions": ["a"], "labels": [1]}]
    examples, stats = encode(tiny, rows)
    assert len(examples) == 1 and stats.empty == 1 and "skipped 1 empty (first: row 0)" in stats.summary()
    with pytest.raises(DataError, match="row 0: no steps"):
        encode(tiny, rows, bad_rows="error")
    with pytest.raises(DataError, match=r"method.step_separator='' gives no token"):
        encode(tiny, rows, separator="")


def test_step_pairs_put_the_prefix_with_the_prompt_and_train_on_one_step(tiny):
    row = {"prompt": "Sam has 12 ...", "prefix": "12 + 7 = 19.\n", "chosen": "19 - 3 = 16.", "rejected": "19 - 3 = 15."}
    (example,), stats = encode_step_pairs([row], tiny, source="pairs.jsonl")
    assert tiny.decode(example["prompt_ids"]) == format_prompt(row["prompt"], tiny) + row["prefix"]
    assert tiny.decode(example["chosen_ids"]) == "19 - 3 = 16."  # the step alone: no end-of-turn marker
    assert tiny.decode(example["rejected_ids"]) == "19 - 3 = 15."
    renamed = {k if k != "prefix" else "initial_reason_steps": v for k, v in row.items()}  # Math-Step-DPO-10K's name
    assert encode_step_pairs([renamed], tiny, source="pairs.jsonl")[0] == [example]
    (first,), _ = encode_step_pairs([{**row, "prefix": ""}], tiny, source="pairs.jsonl")
    assert first["prompt_ids"] == tiny(format_prompt(row["prompt"], tiny), add_special_tokens=False)["input_ids"]


def test_bad_step_pairs_are_skipped_or_refused(tiny):
    row = {"prompt": "q", "prefix": "", "chosen": "a.", "rejected": "b."}
    with pytest.raises(DataError, match=r"pairs.jsonl: row 0: column 'prefix' is missing; .*recipe=dpo"):
        encode_step_pairs([{"prompt": "q", "chosen": "a", "rejected": "b"}], tiny, source="pairs.jsonl")
    with pytest.raises(DataError, match=r"row 0, column 'chosen': expected text"):
        encode_step_pairs([{**row, "chosen": ["a"]}], tiny, source="pairs.jsonl")
    rows = [{**row, "rejected": "a."}, {**row, "chosen": " "}, row]
    examples, stats = encode_step_pairs(rows, tiny, source="pairs.jsonl")
    assert len(examples) == 1 and (stats.identical, stats.empty, stats.first_skipped_index) == (1, 1, 0)
    with pytest.raises(DataError, match="row 0: chosen and rejected must be two different, non-empty steps"):
        encode_step_pairs(rows, tiny, source="pairs.jsonl", bad_rows="error")
    long = {**row, "prefix": "x" * 300}
    with pytest.raises(DataError, match="no usable Step-DPO pair"):
        encode_step_pairs([long], tiny, source="pairs.jsonl", max_length=256)
