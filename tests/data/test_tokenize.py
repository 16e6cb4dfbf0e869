"""encode_row / encode_dataset: loss masks, the prompt-token invariant, over-length policy, stats."""

from __future__ import annotations

import pytest

from polmctl.data import encode_dataset, encode_row, format_prompt, load_rows
from polmctl.errors import DataError
from polmctl.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.unit
IGNORE = -100


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def masked_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE])


def encode(row, tok, fmt="prompt_completion", **kw):
    kw.setdefault("max_length", 512)
    kw.setdefault("completion_only_loss", True)
    kw.setdefault("overlong", "truncate")
    return encode_row(row, fmt, tok, **kw)


def test_prompt_completion_masks_exactly_the_prompt(tiny_tokenizer):
    row = {"prompt": "What is 2+3?", "completion": "5"}
    example = encode(row, tiny_tokenizer)
    prompt_ids = ids_of(tiny_tokenizer, format_prompt(row["prompt"], tiny_tokenizer))
    n = len(prompt_ids)
    assert len(example["labels"]) == len(example["input_ids"])
    assert example["input_ids"][:n] == prompt_ids
    assert example["labels"][:n] == [IGNORE] * n
    assert example["labels"][n:] == example["input_ids"][n:]
    assert trained_text(tiny_tokenizer, example) == "5<|im_end|>\n"


def test_training_prompts_are_the_tokens_evaluation_feeds_the_model(tiny_tokenizer):
    rows = load_rows("builtin:arithmetic", "test", max_rows=5) + load_rows("builtin:instructions", "test", max_rows=5)
    for row in rows:
        fmt = "prompt_completion" if "prompt" in row else "messages"
        example = encode(row, tiny_tokenizer, fmt)
        first_trained = example["labels"].index(next(label for label in example["labels"] if label != IGNORE))
        prompt = row["prompt"] if "prompt" in row else row["messages"][:-1]
        assert example["input_ids"][:first_trained] == ids_of(tiny_tokenizer, format_prompt(prompt, tiny_tokenizer))


def test_multi_turn_masks_every_non_assistant_token(tiny_tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "B1"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "D2"},
        ]
    }
    example = encode(row, tiny_tokenizer, "messages")
    full = tiny_tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert tiny_tokenizer.decode(example["input_ids"]) == full
    assert trained_text(tiny_tokenizer, example) == "B1<|im_end|>\nD2<|im_end|>\n"
    assert masked_text(tiny_tokenizer, example) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )


def test_completion_only_loss_off_trains_every_token(tiny_tokenizer):
    example = encode({"prompt": "p", "completion": "c"}, tiny_tokenizer, completion_only_loss=False)
    assert example["labels"] == example["input_ids"] and IGNORE not in example["labels"]


def test_text_rows_are_text_plus_eos_all_trained(tiny_tokenizer):
    example = encode({"text": "hello"}, tiny_tokenizer, "text")
    assert example["input_ids"] == ids_of(tiny_tokenizer, "hello") + [tiny_tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"]


def test_without_a_chat_template_the_completion_ends_with_eos():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    example = encode({"prompt": "2+3=", "completion": "5"}, tok)
    assert tok.decode(example["input_ids"]) == "2+3=5<|im_end|>"
    assert trained_text(tok, example) == "5<|im_end|>" and masked_text(tok, example) == "2+3="


def test_a_one_token_row_has_nothing_to_train_and_is_dropped():
    tok = build_tiny_tokenizer()
    tok.eos_token = None
    assert encode({"text": "x"}, tok, "text") is None
    kept, stats = encode_dataset([{"text": "x"}, {"text": "xy"}], tok, source="s")
    assert len(kept) == 1 and stats.dropped == 1 and stats.first_dropped_index == 0


ROWS = [
    {"prompt": "short", "completion": "ok"},
    {"prompt": "p", "completion": "x" * 200},
    {"prompt": "q" * 100, "completion": "a"},
    {"prompt": "r", "completion": "b"},
]


def test_truncate_cuts_the_end_and_keeps_the_prompt(tiny_tokenizer):
    kept, stats = encode_dataset(ROWS, tiny_tokenizer, source="s", max_length=64, overlong="truncate")
    prompt_ids = ids_of(tiny_tokenizer, format_prompt("p", tiny_tokenizer))
    full = encode(ROWS[1], tiny_tokenizer, max_length=10_000)
    assert kept[1]["input_ids"] == full["input_ids"][:64] and kept[1]["input_ids"][: len(prompt_ids)] == prompt_ids
    assert kept[1]["labels"] == full["labels"][:64]
    # Row 2's prompt alone is longer than max_length: dropped, not truncated.
    assert len(kept) == 3 and (stats.truncated, stats.dropped, stats.first_dropped_index) == (1, 1, 2)
    assert stats.summary() == (
        f"3/4 rows, {stats.tokens} tokens ({stats.trainable_tokens} trained), 1 truncated, 1 dropped (first: row 2)"
    )


def test_a_prompt_that_fills_max_length_drops_the_row_even_when_prompts_are_trained(tiny_tokenizer):
    kept, stats = encode_dataset(ROWS, tiny_tokenizer, source="s", max_length=64, completion_only_loss=False)
    assert len(kept) == 3 and (stats.truncated, stats.dropped, stats.first_dropped_index) == (1, 1, 2)
    assert encode(ROWS[2], tiny_tokenizer, max_length=64, completion_only_loss=False) is None


def test_drop_removes_overlong_rows(tiny_tokenizer):
    kept, stats = encode_dataset(ROWS, tiny_tokenizer, source="s", max_length=64, overlong="drop")
    assert [encode(r, tiny_tokenizer) for r in (ROWS[0], ROWS[3])] == kept
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped, stats.first_dropped_index) == (4, 2, 0, 2, 1)
    assert encode(ROWS[1], tiny_tokenizer, max_length=64, overlong="drop") is None


def test_error_names_the_row_and_its_length(tiny_tokenizer):
    n = len(encode(ROWS[1], tiny_tokenizer)["input_ids"])
    with pytest.raises(
        DataError,
        match=f"s: row 1 has {n} tokens, more than data.max_length=64; raise "
        "data.max_length or set data.overlong=truncate|drop",
    ):
        encode_dataset(ROWS, tiny_tokenizer, source="s", max_length=64, overlong="error")


def test_stats_count_tokens_and_trained_tokens(tiny_tokenizer):
    kept, stats = encode_dataset(ROWS, tiny_tokenizer, source="s", max_length=64)
    assert stats.tokens == sum(len(e["input_ids"]) for e in kept)
    prompt_len = len(ids_of(tiny_tokenizer, format_prompt("p", tiny_tokenizer)))
    # "ok<|im_end|>\n" + the truncated row's completion + "b<|im_end|>\n" (byte-level: 1 token a byte)
    assert stats.trainable_tokens == 4 + (64 - prompt_len) + 3
    assert stats.trainable_tokens == sum(sum(label != IGNORE for label in e["labels"]) for e in kept)


def test_every_row_dropped_is_an_error_suggesting_max_length(tiny_tokenizer):
    with pytest.raises(DataError, match=r"s: every row was dropped \(0/1 rows.*raise data.max_length \(now 40\)"):
        encode_dataset(ROWS[2:3], tiny_tokenizer, source="s", max_length=40)


def test_auto_format_detection_and_explicit_format(tiny_tokenizer):
    rows = [{"text": "abc"}]
    auto, _ = encode_dataset(rows, tiny_tokenizer, source="s")
    assert auto == [encode(rows[0], tiny_tokenizer, "text")]
    with pytest.raises(DataError, match="s: row 0, column 'prompt' is missing"):
        encode_dataset(rows, tiny_tokenizer, source="s", fmt="prompt_completion")


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p", "completion": ""}, "row 1, column 'completion' is empty"),
        ({"prompt": None, "completion": "c"}, "row 1, column 'prompt' is empty"),
        ({"prompt": "p", "completion": 4}, "row 1, column 'completion' is a int; expected text"),
        ({"prompt": "p"}, "row 1, column 'completion' is missing"),
    ],
)
def test_bad_prompt_completion_rows_name_row_and_column(tiny_tokenizer, row, message):
    with pytest.raises(DataError, match=f"rows.csv: {message}"):
        encode_dataset([ROWS[0], row], tiny_tokenizer, source="rows.csv")


def test_preference_rows_are_not_a_token_level_format(tiny_tokenizer):
    with pytest.raises(DataError, match="format 'preference' cannot be trained with a token-level loss"):
        encode_dataset([{"prompt": "p", "chosen": "a", "rejected": "b"}], tiny_tokenizer, source="s")


def test_unknown_overlong_policy(tiny_tokenizer):
    with pytest.raises(DataError, match="data.overlong='cut'"):
        encode(ROWS[0], tiny_tokenizer, overlong="cut")


# Worked solutions of competition problems: most run past a short max_length, cutting off the final answer.
SOLUTIONS = [
    {
        "prompt": f"Problem {i}: find the sum of the roots of $x^2 - {i + 3}x + {i} = 0$.",
        "completion": (
            f"By Vieta's formulas the sum of the roots of $ax^2 + bx + c$ is $-b/a$. Here $a = 1$ and "
            f"$b = -{i + 3}$, so the sum is ${i + 3}$. " * (1 + i % 3) + f"The answer is $\\boxed{{{i + 3}}}$."
        ),
    }
    for i in range(20)
]


def test_cut_answers_warn_with_the_length_that_keeps_most_rows_whole(tiny_tokenizer, capsys):
    _, stats = encode_dataset(SOLUTIONS, tiny_tokenizer, source="math.jsonl", max_length=256)
    err = " ".join(capsys.readouterr().err.split())
    assert stats.over_length == stats.truncated > 0.05 * stats.rows
    keep = stats.whole_length()
    assert (
        f"warning: {stats.truncated} of 20 math.jsonl rows ({100 * stats.truncated / 20:.0f}%) are longer than "
        f"data.max_length=256 and lose their last tokens, so training sees them without their endings; "
        f"data.max_length={keep} keeps 95% of rows whole" in err
    )
    # That length is the smallest one at which at most 5% of the rows are cut.
    assert sum(n > keep for n in stats.lengths) <= 1 and sum(n > keep - 1 for n in stats.lengths) > 1
    _, whole = encode_dataset(SOLUTIONS, tiny_tokenizer, source="math.jsonl", max_length=keep)
    assert whole.truncated <= 1 and "warning" not in capsys.readouterr().err


def test_dropped_rows_warn_too(tiny_tokenizer, capsys):
    _, stats = encode_dataset(SOLUTIONS, tiny_tokenizer, source="s", max_length=256, overlong="drop")
    assert stats.dropped == stats.over_length > 0
    assert "are dropped (data.overlong=drop)" in " ".join(capsys.readouterr().err.split())


def test_a_few_long_rows_do_not_warn(tiny_tokenizer, capsys):
    rows = [{"prompt": "2+2?", "completion": "4"}] * 40 + SOLUTIONS[:2]  # 2 of 42: under 5%
    _, stats = encode_dataset(rows, tiny_tokenizer, source="s", max_length=100)
    assert stats.truncated == 2 and capsys.readouterr().err == ""
