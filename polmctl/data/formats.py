"""Row formats and the one place a prompt becomes text.

    language modelling    {"text": ...}
    conversational SFT    {"messages": [{"role": ..., "content": ...}, ...]}
    prompt-completion     {"prompt": ..., "completion": ...}   (strings or message lists)
    preference (paired)   {"prompt": ..., "chosen": ..., "rejected": ...}
    preference (unpaired) {"prompt": ..., "completion": ..., "label": true|false}

``format_prompt`` renders what the model is conditioned on; training, evaluation and
chat all call it, so a row's prompt is byte-identical in all three. ``format_completion``
is what follows it, end-of-turn marker included.
"""

from __future__ import annotations

from typing import Any

from polmctl.errors import DataError

# Checked in order: the first column set a row has decides its format.
FORMATS = {
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")


def detect_format(row: dict, source: str) -> str:
    """The format of ``source``'s rows, from the columns of its first row."""
    if not isinstance(row, dict):
        raise DataError(f"{source}: row 0 is a {type(row).__name__}, not a row with named columns")
    for name, columns in FORMATS.items():
        if all(c in row for c in columns):
            return name
    accepted = "; ".join("{" + ", ".join(c) + "}" for c in FORMATS.values())
    raise DataError(
        f"{source}: row 0 has columns {sorted(row)}, which match no known format; "
        f"accepted column sets: {accepted}. Rename the columns or convert the file"
    )


def check_messages(messages: Any, where: str) -> None:
    """A non-empty list of {role, content} dicts with known roles and text content."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: expected a non-empty list of {{role, content}} messages, "
            f"got {type(messages).__name__} {messages!r:.60}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} needs 'role' and 'content' keys, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content is {type(m['content']).__name__}, not text")


def _as_messages(value: Any, role: str, where: str) -> list[dict]:
    messages = [{"role": role, "content": value}] if isinstance(value, str) else value
    check_messages(messages, where)
    return list(messages)


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises TemplateError / raise_exception(...) for rows a template refuses
        raise DataError(
            f"{where}: the chat template cannot render these messages ({type(err).__name__}: "
            f"{err}); check the roles and their order, or set model.chat_template"
        ) from None


def _check_template(tokenizer, what: str, where: str) -> None:
    if not tokenizer.chat_template:
        raise DataError(
            f"{where}: {what} needs a chat template, and the tokenizer has none; "
            "set model.chat_template or use string prompts and completions"
        )


def format_prompt(prompt: Any, tokenizer, *, where: str = "prompt") -> str:
    """The text a model is conditioned on for ``prompt`` (a string or a message list).

    With a chat template a string becomes one user message and the render ends with the
    assistant's generation prompt; without one a string is used as it is.
    """
    if tokenizer.chat_template:
        return _render(tokenizer, _as_messages(prompt, "user", where), True, where)
    if not isinstance(prompt, str):
        _check_template(tokenizer, "a message-list prompt", where)
    return prompt


def format_completion(prompt: Any, completion: Any, tokenizer, *, where: str = "completion") -> str:
    """The text after ``format_prompt(prompt)`` for ``completion`` (a string or assistant
    message list), end-of-turn marker included, so the two concatenate to the full
    rendered conversation."""
    if not tokenizer.chat_template:
        if not isinstance(completion, str):
            _check_template(tokenizer, "a message-list completion", where)
        return completion + (tokenizer.eos_token or "")
    prompt_text = format_prompt(prompt, tokenizer, where=where)
    prompt_messages = _as_messages(prompt, "user", where)
    full = _render(tokenizer, prompt_messages + _as_messages(completion, "assistant", where), False, where)
    if not full.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template renders the prompt differently once an answer follows it, "
            "so the completion cannot be separated; set model.chat_template to a prefix-stable template"
        )
    return full[len(prompt_text) :]


def conversation_segments(messages: Any, tokenizer, where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation; every assistant turn is trained.

    Built by rendering the conversation up to each assistant turn with the generation
    prompt, so each answer is trained after exactly the text the model sees at that turn,
    and the pieces concatenate to the whole rendered conversation.
    """
    check_messages(messages, where)
    _check_template(tokenizer, "a conversational row", where)
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message must be the assistant's (it is {messages[-1]['role']!r}); "
            "drop the trailing messages or add the answer"
        )
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: message 0 is the assistant's; a conversation starts with a user (or system) message")
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:i], True, where)
        full = _render(tokenizer, messages[: i + 1], False, where)
        if not prompt_text.startswith(done) or not full.startswith(prompt_text):
            raise DataError(
                f"{where}: the chat template is not prefix-stable at message {i}, so assistant "
                "turns cannot be masked; set model.chat_template to a template that is"
            )
        if len(prompt_text) > len(done):
            segments.append((prompt_text[len(done) :], False))
        segments.append((full[len(prompt_text) :], True))
        done = full
    return segments
