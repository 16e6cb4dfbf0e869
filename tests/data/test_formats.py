"""Format detection, prompt/completion templating, multi-turn segments and their errors."""

from __future__ import annotations

import pytest

from polmctl.data import detect_format, encode_dataset, format_completion, format_prompt
from polmctl.data.formats import conversation_segments
from polmctl.errors import DataError
from polmctl.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.unit

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "B1"},
    {"role": "user", "content": "c"},
    {"role": "assistant", "content": "D2"},
]


@pytest.fixture()
def plain_tokenizer():
    """The tiny tokenizer without a chat template."""
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    return tok


def tokenizer_with(template: str):
    tok = build_tiny_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"text": "x"}, "text"),
        ({"messages": [], "answer": "1"}, "messages"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": "a", "completion": "b", "answer": "b"}, "prompt_completion"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"prompt": "a", "completion": "b", "label": True}, "unpaired"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row, "s") == fmt


def test_unknown_columns_name_source_row_columns_and_accepted_sets():
    with pytest.raises(
        DataError,
        match=r"rows.jsonl: row 0 has columns \['input', 'output'\], which match no "
        r"known format; accepted column sets: .*\{prompt, completion\}; "
        r"\{messages\}; \{text\}",
    ):
        detect_format({"output": 2, "input": 1}, "rows.jsonl")
    with pytest.raises(DataError, match="rows.jsonl: row 0 is a list"):
        detect_format(["a"], "rows.jsonl")


def test_format_prompt_with_a_chat_template(tiny_tokenizer):
    expected = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("What is 2+3?", tiny_tokenizer) == expected
    assert format_prompt([{"role": "user", "content": "What is 2+3?"}], tiny_tokenizer) == expected


def test_format_prompt_without_a_chat_template(plain_tokenizer):
    assert format_prompt("What is 2+3?", plain_tokenizer) == "What is 2+3?"
    with pytest.raises(DataError, match="needs a chat template.*set model.chat_template"):
        format_prompt([{"role": "user", "content": "hi"}], plain_tokenizer)


@pytest.mark.parametrize(
    "prompt,completion",
    [
        ("Hi", "Hello"),
        (CHAT[:2], "Hello"),
        (CHAT[:4], [{"role": "assistant", "content": "Hello"}]),
    ],
)
def test_prompt_and_completion_concatenate_to_the_full_conversation(tiny_tokenizer, prompt, completion):
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + (
        [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    )
    text = format_completion(prompt, completion, tiny_tokenizer)
    assert text == "Hello<|im_end|>\n"
    assert format_prompt(prompt, tiny_tokenizer) + text == tiny_tokenizer.apply_chat_template(messages, tokenize=False)


def test_format_completion_without_a_chat_template_appends_eos(plain_tokenizer):
    assert format_completion("2+3=", "5", plain_tokenizer) == "5<|im_end|>"
    with pytest.raises(DataError, match="needs a chat template"):
        format_completion("2+3=", [{"role": "assistant", "content": "5"}], plain_tokenizer)


def test_a_template_that_changes_the_prompt_once_answered_is_refused():
    # Marks the last message, so the prompt renders differently with an answer after it.
    tok = tokenizer_with(
        "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}A:{% endif %}"
    )
    with pytest.raises(DataError, match="completion: the chat template renders the prompt differently"):
        format_completion("q", "a", tok)
    with pytest.raises(
        DataError, match="row 0, column 'messages': the chat template is not prefix-stable at message 1"
    ):
        encode_dataset([{"messages": CHAT[1:3]}], tok, source="s")


def test_a_template_that_raises_becomes_a_data_error():
    tok = tokenizer_with(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(
        DataError,
        match=r"rows.jsonl: row 0, column 'messages': the chat template cannot render "
        r"these messages \(.*no system role\)",
    ):
        encode_dataset([{"messages": CHAT}], tok, source="rows.jsonl")


def test_multi_turn_segments_train_every_assistant_turn(tiny_tokenizer):
    segments = conversation_segments(CHAT, tiny_tokenizer, "s")
    assert "".join(text for text, _ in segments) == tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert [text for text, trained in segments if trained] == ["B1<|im_end|>\n", "D2<|im_end|>\n"]
    assert segments[0] == (format_prompt(CHAT[:2], tiny_tokenizer), False)
    assert segments[2] == ("<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n", False)


def test_consecutive_assistant_messages_train_each_but_not_the_turn_header(tiny_tokenizer):
    messages = CHAT[1:3] + [{"role": "assistant", "content": "more"}]
    segments = conversation_segments(messages, tiny_tokenizer, "s")
    assert segments[-2:] == [("<|im_start|>assistant\n", False), ("more<|im_end|>\n", True)]


@pytest.mark.parametrize(
    "messages,message",
    [
        ([{"role": "user", "content": "hi"}], "last message must be the assistant's"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "message 0 has role 'robot'"),
        ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "message 0 needs 'role' and 'content'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 1 needs 'role' and 'content'"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "message 0 content is int"),
        ([{"role": "assistant", "content": "x"}], "message 0 is the assistant's"),
        ([], "expected a non-empty list"),
        ("hello", "expected a non-empty list"),
    ],
)
def test_bad_conversations_name_source_row_and_column(tiny_tokenizer, messages, message):
    good = {"messages": CHAT[1:3]}
    with pytest.raises(DataError, match=rf"rows.jsonl: row 1, column 'messages': .*{message}"):
        encode_dataset([good, {"messages": messages}], tiny_tokenizer, source="rows.jsonl")


def test_conversational_rows_need_a_chat_template(plain_tokenizer):
    with pytest.raises(DataError, match="row 0, column 'messages': a conversational row needs a chat template"):
        encode_dataset([{"messages": CHAT}], plain_tokenizer, source="s")


def test_bad_message_list_prompts_name_the_column(tiny_tokenizer):
    rows = [{"prompt": [{"role": "user"}], "completion": "x"}]
    with pytest.raises(DataError, match="s: row 0, column 'prompt': message 0 needs 'role' and 'content'"):
        encode_dataset(rows, tiny_tokenizer, source="s")
