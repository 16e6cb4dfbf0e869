"""Chat with a model or a finished run, through its chat template, streaming the reply.

    polmctl chat outputs/lora/2026-11-24/10-00-00              # interactive: /reset, /exit (or Ctrl-D)
    polmctl chat builtin:smollm2-135m --prompt "What is 12+7?"  # one reply, then exit
    polmctl chat outputs/lora/... --cache quantized --cache-nbits 4   # keys and values in 4 bits

The conversation is rendered by ``polmctl.data.format_prompt``, the function training and
evaluation use, so a run is chatted with exactly as it was trained. When the history outgrows
the model's context, the oldest turns are dropped (a system prompt stays).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from polmctl.entry import quiet_libraries

quiet_libraries()  # before transformers (and through peft, torchao and bitsandbytes) load and log
from transformers import TextStreamer, set_seed  # noqa: E402

from polmctl.config.schema import GenerationConfig  # noqa: E402
from polmctl.errors import CommandError, ConfigError  # noqa: E402
from polmctl.models.precision import check_dtype_flag  # noqa: E402


@dataclass
class ChatSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    system: str | None = None
    device: str = "auto"
    seed: int | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # the KV cache (--cache ...)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None


def load_for_chat(name_or_path: str, device: torch.device, dtype: str = "auto_gpu"):
    """(model in eval mode, tokenizer) of a run dir, model dir, builtin:<name> or hub id, its
    weights in ``dtype`` (as model.dtype: auto_gpu, the default, is bf16 on recent GPUs)."""
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model, load_tokenizer, model_head, resolve_model_path

    check_dtype_flag(dtype)
    cfg = ModelConfig(name_or_path=name_or_path, dtype=dtype)
    if model_head(resolve_model_path(name_or_path)) == "reward":
        raise CommandError(
            f"{name_or_path} is a reward model (it scores text, it does not write any); "
            "chat with a causal LM or with the run that trained the policy"
        )
    tokenizer = load_tokenizer(cfg)
    return load_model(cfg, device=device, for_training=False), tokenizer


class WriterStreamer(TextStreamer):
    """transformers' TextStreamer, writing through ``write`` instead of print."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.write(text)


class ChatSession:
    """A conversation with one model: ``reply(text)`` streams the answer through ``write`` and returns it."""

    def __init__(self, model, tokenizer, settings: ChatSettings, write: Callable[[str], None]):
        self.model, self.tokenizer, self.settings, self.write = model, tokenizer, settings, write
        self.context = getattr(model.config, "max_position_embeddings", None)
        peft_config = getattr(model, "active_peft_config", None)
        self.prompt_learning = bool(getattr(peft_config, "is_prompt_learning", False))
        if self.context and self.prompt_learning:  # the soft prompt takes positions too
            self.context -= getattr(peft_config, "num_virtual_tokens", 0) or 0
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.settings.system}] if self.settings.system else []

    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        try:
            answer = self._generate(*self._fit_prompt())
        except BaseException:  # a refused prompt or Ctrl-C mid-reply: this turn is not kept
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _encode(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        from polmctl.data import format_prompt

        if self.tokenizer.chat_template:
            rendered = format_prompt(messages, self.tokenizer, where="chat")
        else:  # a plain LM: one message is continued as it is
            rendered = format_prompt(messages[-1]["content"], self.tokenizer, where="chat")
        return rendered, self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def _fit_prompt(self) -> tuple[str, list[int]]:
        """The prompt (text, token ids), dropping the oldest turns until prompt + reply fit the context.

        The history is only cut once the prompt fits: a message too long on its own leaves it as it was.
        """
        kept = list(self.messages)
        rendered, ids = self._encode(kept)
        budget = (self.context or 0) - self.settings.max_new_tokens
        first = 1 if kept[0]["role"] == "system" else 0
        while self.context and len(ids) > budget and len(kept) - first > 1:
            del kept[first : first + 2]  # the oldest user turn and its answer
            rendered, ids = self._encode(kept)
        if self.context and len(ids) > budget:
            raise CommandError(
                f"the message is {len(ids)} tokens and the model's context is {self.context}, "
                f"with --max-new-tokens {self.settings.max_new_tokens} kept for the reply; "
                "send a shorter message or lower --max-new-tokens"
            )
        self.messages = kept
        return rendered, ids

    def _stop_ids(self) -> list[int]:
        """The tokenizer's eos and every end token the model's generation config names (some chat
        models end a turn with a token other than eos)."""
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        return list(dict.fromkeys(t for t in [self.tokenizer.eos_token_id, *configured] if t is not None))

    @torch.no_grad()
    def _generate(self, rendered: str, ids: list[int]) -> str:
        from polmctl.rollout.generate import decoding_kwargs, generate, generation_mode

        s, tok = self.settings, self.tokenizer
        sample = s.temperature > 0
        if self.prompt_learning:
            # peft's generate is wrong for prompt/prefix tuning (see rollout/generate.py): its own
            # decoding loop is right but cannot stream, so the reply is written whole.
            text = generate(
                self.model,
                tok,
                [rendered],
                max_new_tokens=s.max_new_tokens,
                batch_size=1,
                do_sample=sample,
                temperature=s.temperature or 1.0,
                top_p=s.top_p,
            )[0]
            self.write(text)
            return text.strip()
        decoding = decoding_kwargs(sample, s.temperature or 1.0, s.top_p, 0)
        with generation_mode(self.model, tok) as device:
            input_ids = torch.tensor([ids], device=device)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=s.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=self._stop_ids(),
                streamer=WriterStreamer(tok, self.write),
                **decoding,
            )
        return tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def chat_loop(
    session: ChatSession, read: Callable[[str], str], write: Callable[[str], None], note: Callable[[str], None]
) -> None:
    """Read a line, stream the reply; /reset clears the history, /exit or end of input stops."""
    note("/reset clears the conversation, /exit (or Ctrl-D) quits")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            note("conversation cleared")
            continue
        if line.startswith("/"):
            note(f"unknown command {line.split()[0]}; /reset or /exit")
            continue
        write("model> ")
        try:
            session.reply(line)
        except KeyboardInterrupt:
            note("\n(interrupted: this turn is dropped)")
            continue
        except CommandError as err:  # too long for the context: say so, keep chatting
            note(str(err))
            continue
        write("\n")


@contextmanager
def cache_flags() -> Iterator[None]:
    """A generation.cache_* ConfigError as a CommandError naming chat's --cache-* option."""
    try:
        yield
    except ConfigError as err:
        flag = "--" + err.key.removeprefix("generation.").replace("_", "-")
        raise CommandError(f"{flag}{str(err).removeprefix(err.key)}") from None


def run_chat(
    name_or_path: str,
    settings: ChatSettings,
    prompt: str | None,
    *,
    read: Callable[[str], str],
    write: Callable[[str], None],
    note: Callable[[str], None],
) -> None:
    """One reply to ``prompt``, or (``prompt`` None) the interactive loop."""
    from polmctl.rollout.cache import check_backend, check_fits, generation_cache

    with cache_flags():
        settings.generation.check("generation")
        check_backend(settings.generation, "generation.cache_backend")
    device = pick_device(settings.device)
    note(f"loading {name_or_path} on {device}")
    model, tokenizer = load_for_chat(name_or_path, device)
    if settings.seed is not None:
        set_seed(settings.seed)  # after loading, so the first reply depends on the seed alone
    if not tokenizer.chat_template and (prompt is None or settings.system):
        raise CommandError(
            f"{name_or_path} has no chat template, so it cannot hold a conversation; use "
            "--prompt TEXT (without --system) to continue a text, or a model with a chat template"
        )
    session = ChatSession(model, tokenizer, settings, write)
    if settings.generation.cache == "quantized":
        if session.prompt_learning:
            raise CommandError(f"{name_or_path} is a prompt-learning adapter (no KV cache to quantize); drop --cache")
        with cache_flags():
            check_fits(model, settings.generation)
    with generation_cache(model, settings.generation):
        if prompt is not None:
            session.reply(prompt)
            write("\n")
            return
        chat_loop(session, read, write, note)
