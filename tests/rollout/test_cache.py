"""generation.cache=quantized (polmctl/rollout/cache.py): transformers' QuantizedCache through the model's
generation config, for evaluation, rollouts and chat; what it keeps and what it saves.

What is compared with the plain cache: on a generation past the residual window (the prompt is quantized
after the prefill, the new tokens every ``residual_length`` steps), the greedy tokens are the same and each
step's logits differ from the plain cache's (the quantized path ran) by a small fraction of their spread."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from polmctl.compose import compose_config
from polmctl.config.schema import GenerationConfig
from polmctl.errors import ConfigError
from polmctl.models.tiny import build_tiny_model
from polmctl.rollout import cache as C
from polmctl.rollout.backends import TransformersBackend
from polmctl.validate import validate

pytestmark = pytest.mark.unit
NEW_TOKENS = 48
RESIDUAL = 16


def settings(backend: str, nbits: int) -> GenerationConfig:
    return GenerationConfig(
        cache="quantized", cache_backend=backend, cache_nbits=nbits, cache_group_size=16, cache_residual_length=RESIDUAL
    )


def run(model, ids, gen: GenerationConfig | None):
    with C.generation_cache(model, gen):
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )


@pytest.mark.parametrize(
    "backend,nbits,max_ratio,max_drift",
    # measured here: cache bytes 0.50 / 0.40 / 0.40 / 0.25 of the plain cache's, logit drift 0.003 / 0.06 / 0.16
    # / 0.08 of the logits' spread (fewer bits, more drift; groups of 16 carry their scale and zero point)
    [("hqq", 8, 0.55, 0.01), ("hqq", 4, 0.45, 0.15), ("quanto", 4, 0.45, 0.3), ("fp8", 8, 0.3, 0.15)],
)
def test_quantized_cache_keeps_the_greedy_tokens_in_less_memory(tiny_tokenizer, backend, nbits, max_ratio, max_drift):
    model = build_tiny_model(tiny_tokenizer).eval()
    ids = torch.randint(0, 250, (2, 30), generator=torch.Generator().manual_seed(0))
    plain = run(model, ids, None)
    quantized = run(model, ids, settings(backend, nbits))
    assert type(quantized.past_key_values).__name__ == "QuantizedCache"
    assert torch.equal(quantized.sequences, plain.sequences)
    finite = torch.isfinite(plain.scores[0])  # min_new_tokens masks the end-of-sequence token
    spread = torch.stack([s[finite] for s in plain.scores]).std().item()
    drift = [(q - p)[finite].abs().max().item() / spread for q, p in zip(quantized.scores, plain.scores)]
    assert 0 < max(drift[RESIDUAL:]) < max_drift, drift
    ratio = C.cache_bytes(quantized.past_key_values) / C.cache_bytes(plain.past_key_values)
    assert ratio < max_ratio, ratio
    assert model.generation_config.cache_implementation is None  # put back after the block


def test_cache_bytes_counts_every_stored_tensor_once(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    ids = torch.randint(0, 250, (1, 10), generator=torch.Generator().manual_seed(1))
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    config = model.config  # 2 layers, keys and values of 2 KV heads x 16 dims, float32, 14 positions
    expected = config.num_hidden_layers * 2 * 2 * 16 * 14 * 4
    assert C.cache_bytes(out.past_key_values) == expected


def test_dynamic_cache_changes_nothing_and_fp8_takes_no_group_options():
    assert C.cache_settings(GenerationConfig()) is None and C.cache_settings(None) is None
    assert C.cache_settings(GenerationConfig(cache="quantized", cache_backend="fp8", cache_nbits=8)) == {
        "cache_implementation": "quantized",
        "cache_config": {"backend": "fp8"},
    }
    assert C.cache_settings(settings("hqq", 4))["cache_config"] == {
        "backend": "hqq",
        "nbits": 4,
        "q_group_size": 16,
        "residual_length": RESIDUAL,
    }


@pytest.mark.parametrize(
    "overrides,key,hint",
    [
        (["generation.cache_backend=quanto", "generation.cache_nbits=8"], "generation.cache_nbits", "2, 4"),
        (["generation.cache_backend=fp8"], "generation.cache_nbits", "allowed: 8"),
        (["generation.cache=kivi"], "generation.cache", "dynamic, quantized"),
        (["peft=prompt_tuning", "data.packing=false"], "generation.cache", "without a KV cache"),
        (["recipe=grpo", "method.generation_backend=vllm"], "generation.cache", "vllm keeps its own"),
    ],
)
def test_impossible_cache_settings_fail_at_validation(overrides, key, hint):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["generation.cache=quantized", *overrides]))
    assert info.value.key == key and hint in str(info.value), str(info.value)


@pytest.mark.parametrize("backend,package", [("hqq", "hqq"), ("quanto", "optimum-quanto")])
def test_a_missing_backend_names_its_pip_install(monkeypatch, backend, package):
    real = importlib.util.find_spec
    module = C.BACKEND_PACKAGES[backend][0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ConfigError, match=rf"generation.cache_backend: .*pip install {package}"):
        validate(compose_config(["generation.cache=quantized", f"generation.cache_backend={backend}"]))


def test_rollouts_sample_with_the_quantized_cache_and_prefill_each_sample(tiny_tokenizer, monkeypatch):
    """Inside the block the backend's generate runs on the quantized cache; the prefill is not shared
    (a quantized cache cannot be repeated along the batch), and the samples still come back grouped."""
    model = build_tiny_model(tiny_tokenizer)
    seen = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append((model.generation_config.cache_implementation, "past_key_values" in kwargs or "cache" in kwargs))
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    with C.generation_cache(model, settings("hqq", 4)):
        ids = TransformersBackend().generate(model, tiny_tokenizer, ["12 + 3 =", "7 * 8 ="], 3, max_new_tokens=24)
    assert len(ids) == 6 and all(ids)
    assert seen == [("quantized", False)]
    TransformersBackend().generate(model, tiny_tokenizer, ["12 + 3 ="], 3, max_new_tokens=4)
    assert seen[-1] == (None, True)  # outside the block: the plain cache, its prefill shared


def test_a_group_size_that_does_not_divide_the_head_dim_is_refused(tiny_tokenizer):
    """The tiny model's head dim is 16: groups of 64 would split its keys at some prompt lengths only."""
    model = build_tiny_model(tiny_tokenizer)
    with pytest.raises(ConfigError, match="generation.cache_group_size: 64 does not divide the model's head dim 16"):
        with C.generation_cache(model, GenerationConfig(cache="quantized")):
            pass
    with C.generation_cache(model, GenerationConfig(cache="quantized", cache_backend="fp8", cache_nbits=8)):
        pass  # fp8 has no groups
