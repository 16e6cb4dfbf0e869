"""Row formats and the one place a row becomes text.

    language modelling   {"text": ...}
    conversational SFT   {"messages": [{"role": ..., "content": ...}, ...]}
    prompt-completion    {"prompt": ..., "completion": ...}   (strings or message lists)
    preference (paired)  {"prompt": ..., "chosen": ..., "rejected": ...}
    preference (unpaired){"prompt": ..., "completion": ..., "label": true|false}

``format_prompt`` renders what the model is conditioned on; training, evaluation and
chat all call it, so a row's prompt is byte-identical in all three.
"""

from __future__ import annotations

from typing import Any

from polmctl.data.errors import DataError

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
    for name, columns in FORMATS.items():
        if all(c in row for c in columns):
            return name
    accepted = "; ".join("{" + ", ".join(c) + "}" for c in FORMATS.values())
    raise DataError(f"{source}: row 0 has columns {sorted(row)}, which match no known format; "
                    f"accepted column sets: {accepted}")


def _messages(value: Any, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} needs 'role' and 'content' keys, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} content is {type(m['content']).__name__}, not text")


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def format_prompt(prompt: Any, tokenizer) -> str:
    """The text a model is conditioned on for ``prompt`` (a string or a message list)."""
    if tokenizer.chat_template:
        messages = _messages(prompt, "user")
        check_messages(messages, "prompt")
        return _render(tokenizer, messages, True)
    if not isinstance(prompt, str):
        raise DataError("prompt is a message list but the tokenizer has no chat template; "
                        "set model.chat_template or use string prompts")
    return prompt


def format_completion(prompt: Any, completion: Any, tokenizer) -> str:
    """The text after ``format_prompt(prompt)`` for ``completion``, end-of-turn marker included."""
    if not tokenizer.chat_template:
        if not isinstance(completion, str):
            raise DataError("completion is a message list but the tokenizer has no chat template")
        return completion + (tokenizer.eos_token or "")
    prompt_text = format_prompt(prompt, tokenizer)
    full = _render(tokenizer, _messages(prompt, "user") + _messages(completion, "assistant"), False)
    if not full.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently once the answer follows it, so the "
                        "completion cannot be separated; set model.chat_template to a prefix-stable template")
    return full[len(prompt_text):]


def conversation_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation: every assistant turn is trained.

    Built by rendering the conversation up to each assistant turn, so multi-turn rows
    train on each answer with the exact prompt the model would see at that turn.
    """
    check_messages(messages, where)
    if not tokenizer.chat_template:
        raise DataError(f"{where}: conversational rows need a chat template; set model.chat_template")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (it is {messages[-1]['role']!r})")
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:i], True) if i else ""
        full = _render(tokenizer, messages[: i + 1], False)
        if not prompt_text.startswith(done) or not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template is not prefix-stable at message {i}, so assistant "
                            "turns cannot be masked; set model.chat_template")
        if prompt_text[len(done):]:
            segments.append((prompt_text[len(done):], False))
        segments.append((full[len(prompt_text):], True))
        done = full
    return segments
