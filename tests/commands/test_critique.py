"""``polmctl data critique``: principles files, the draft -> critique -> revision conversation, and
rows the SFT and DPO encoders take, written by the command on the tiny model."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import torch
from typer.testing import CliRunner

import polmctl.cli as cli
from polmctl.commands.critique import (
    CRITIQUE_REQUEST,
    CritiqueStats,
    Principle,
    critique_and_revise,
    load_principles,
    pairs_path,
)
from polmctl.data import encode_dataset
from polmctl.data.preference import encode_preference_dataset
from polmctl.errors import CommandError

pytestmark = pytest.mark.cli


def polmctl(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def test_the_default_principles_and_the_file_formats(tmp_path):
    shipped = load_principles()
    assert [p.name for p in shipped] == ["correct", "helpful", "concise", "harmless"]
    assert all(p.critique and p.revision for p in shipped)

    (tmp_path / "p.yaml").write_text("- Be kind.\n- name: short\n  critique: Too long?\n  revision: Shorten it.\n")
    kind, short = load_principles(tmp_path / "p.yaml")
    assert kind.critique == CRITIQUE_REQUEST.format(principle="Be kind.") and "Be kind." in kind.revision
    assert short == Principle("short", "Too long?", "Shorten it.")
    (tmp_path / "p.txt").write_text("# mine\nBe kind.\n\nBe brief.\n")
    assert [p.name for p in load_principles(tmp_path / "p.txt")] == ["Be kind.", "Be brief."]


@pytest.mark.parametrize(
    "text,message",
    [
        ("{critique: x}", "expected a YAML list"),
        ("- critique: Why?", "item 0 lacks ['revision']"),
        ("- {critique: a, revision: b, weight: 2}", "unknown keys ['weight']"),
        ("- 3", "item 0: got 3"),
        ("[]", "no principles"),
    ],
)
def test_a_bad_principles_file_is_named_with_its_item(tmp_path, text, message):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(CommandError, match=re.escape(message)):
        load_principles(tmp_path / "p.yaml")
    with pytest.raises(CommandError, match="no such file"):
        load_principles(tmp_path / "missing.yaml")


def test_each_round_critiques_the_current_answer_and_revises_after_the_critique(monkeypatch, tiny_tokenizer):
    asked = []

    def scripted(model, tokenizer, prompts, **_):
        asked.append(list(prompts))
        step = ["draft", "critique", "revision", "critique 2", "revision 2"][len(asked) - 1]
        return [f"{step} {i}" for i in range(len(prompts))]

    monkeypatch.setattr(importlib.import_module("polmctl.rollout.generate"), "generate", scripted)
    rule = Principle("kind", "Is it kind?", "Make it kind.")
    rows = [
        {"prompt": "q0", "answer": "1"},
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}]},
    ]
    sft, pairs, stats = critique_and_revise(None, tiny_tokenizer, rows, [rule], rounds=2)
    assert len(asked) == 5 and all(len(p) == 2 for p in asked)
    critique_round_2 = asked[3][0]
    for text in ("q0", "revision 0", "Is it kind?"):  # the second critique sees the first revision
        assert text in critique_round_2
    assert "draft 0" not in critique_round_2
    assert asked[4][0].endswith("<|im_start|>assistant\n") and "critique 2 0" in asked[4][0]
    assert sft[0] == {
        "prompt": "q0",
        "completion": "revision 2 0",
        "principle": "kind, kind",
        "critique": "critique 2 0",
    }
    assert sft[1]["prompt"] == [{"role": "user", "content": "q1"}]  # the prompt of a conversation row
    assert pairs[0] == {"prompt": "q0", "chosen": "revision 2 0", "rejected": "draft 0", "principle": "kind, kind"}
    assert stats.sft_rows == stats.pairs == 2 and stats.principles_used == {"kind": 4}


TINY_RUN = ["data", "critique", "builtin:arithmetic", "--model", "builtin:tiny", "--max-rows", "3", "--device", "cpu"]


def test_the_command_writes_rows_the_sft_and_dpo_encoders_take(tmp_path, tiny_tokenizer):
    out = tmp_path / "cai.jsonl"
    sampled = ["--max-new-tokens", "8", "--temperature", "1", "--seed", "3"]  # greedy, the random model says "\n"
    result = polmctl(*TINY_RUN, *sampled, "--out", str(out))
    assert result.exit_code == 0, result.output
    sft = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [json.loads(line) for line in pairs_path(out).read_text().splitlines()]
    assert f"3 prompts: {len(sft)} SFT rows" in result.output and len(sft) >= 1 and len(pairs) >= 1
    examples, stats = encode_dataset(sft, tiny_tokenizer, source=str(out))
    assert stats.kept == len(sft) and all(any(label != -100 for label in e["labels"]) for e in examples)
    encoded, stats = encode_preference_dataset(pairs, tiny_tokenizer, source="pairs", bad_rows="error")
    assert stats.kept == len(pairs) and all(e["chosen_ids"] != e["rejected_ids"] for e in encoded)
    # Seeded: the same command writes the same rows.
    again = tmp_path / "again.jsonl"
    assert polmctl(*TINY_RUN, *sampled, "--out", str(again)).exit_code == 0
    assert again.read_text() == out.read_text()


def test_nothing_is_written_when_no_revision_has_any_text(tmp_path):
    out = tmp_path / "cai.jsonl"
    result = polmctl(*TINY_RUN, "--max-new-tokens", "4", "--out", str(out))  # greedy: only newlines
    assert result.exit_code == 2 and "revised none of the 3 prompts" in result.output
    assert not out.exists() and not pairs_path(out).exists()


def test_the_command_refuses_bad_outputs_before_loading_anything(tmp_path):
    result = polmctl("data", "critique", "builtin:arithmetic", "--out", str(tmp_path / "rows.csv"))
    assert result.exit_code == 2 and "--out" in result.output and ".jsonl" in result.output
    result = polmctl(
        "data",
        "critique",
        "builtin:arithmetic",
        "--out",
        str(tmp_path / "a.jsonl"),
        "--pairs",
        str(tmp_path / "a.jsonl"),
    )
    assert result.exit_code == 2 and "need two files" in result.output


@pytest.mark.parametrize("dtype,loaded", [("bfloat16", torch.bfloat16), ("auto_gpu", torch.float32)])
def test_dtype_reaches_the_model_that_critiques(tmp_path, monkeypatch, dtype, loaded):
    seen = []

    def one_revision(model, tokenizer, rows, principles, **_):
        seen.append(next(model.parameters()).dtype)
        stats = CritiqueStats(rows=len(rows), sft_rows=1)
        return [{"prompt": "q", "completion": "a", "principle": "p", "critique": "c"}], [], stats

    monkeypatch.setattr(importlib.import_module("polmctl.commands.critique"), "critique_and_revise", one_revision)
    result = polmctl(*TINY_RUN, "--dtype", dtype, "--out", str(tmp_path / "cai.jsonl"))
    assert result.exit_code == 0, result.output
    assert seen == [loaded]  # auto_gpu, the default, keeps float32 on the CPU


def test_a_bad_dtype_is_refused_before_loading_anything(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(importlib.import_module("polmctl.commands.chat"), "load_for_chat", no_load)
    result = polmctl(*TINY_RUN, "--dtype", "bf16", "--out", str(tmp_path / "cai.jsonl"))
    assert result.exit_code == 2 and "--dtype bf16: choose one of auto_gpu, auto, float32, bfloat16" in result.output
    assert not (tmp_path / "cai.jsonl").exists()
