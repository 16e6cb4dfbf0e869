"""The unlearning eval tasks: accuracy counts the answers a model states, on the rows of one role,
and the perplexity is that of the reference answers."""

from __future__ import annotations

import math

import pytest

import polmctl.evals.unlearn as unlearn_eval
from polmctl.config.schema import ModelConfig
from polmctl.data import load_rows
from polmctl.errors import DataError
from polmctl.models import load_model, load_tokenizer

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")


def test_accuracy_on_one_role_and_the_answers_perplexity(monkeypatch):
    rows = load_rows("builtin:facts", "train")[:30]
    forget = [r for r in rows if r["role"] == "forget"]
    knows = {r["prompt"] for r in forget[::2]}
    by_rendered = {}

    def fake_generate(model, tokenizer, prompts, **_):  # the model "knows" every other forget fact
        return [by_rendered[p] for p in prompts]

    tok, model = load_tokenizer(TINY), load_model(TINY, for_training=False)
    for r in rows:
        by_rendered[unlearn_eval.format_prompt(r["prompt"], tok)] = r["completion"] if r["prompt"] in knows else "?"
    monkeypatch.setattr(unlearn_eval, "generate", fake_generate)
    result = unlearn_eval.fact_recall(model, tok, rows, role="forget", batch_size=4, max_new_tokens=8)
    metrics = result["metrics"]
    assert metrics["n"] == len(forget) and metrics["accuracy"] == pytest.approx(len(knows) / len(forget))
    assert [s["correct"] for s in result["samples"]] == [r["prompt"] in knows for r in forget]
    # the random model's answer tokens: near-uniform over its 260-token vocabulary
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"])) and 100 < metrics["perplexity"] < 700


def test_rows_without_the_role_are_refused_naming_where_to_look():
    tok, model = load_tokenizer(TINY), load_model(TINY, for_training=False)
    with pytest.raises(DataError, match="none of 1 held-out rows has role='retain'"):
        unlearn_eval.fact_recall(
            model,
            tok,
            [{"prompt": "q", "completion": "a", "answer": "a"}],
            role="retain",
            batch_size=4,
            max_new_tokens=4,
        )
