"""A quantized KV cache for every generation of a run: transformers' ``QuantizedCache``.

    polmctl eval outputs/lora/... generation.cache=quantized                       # 4-bit keys and values (hqq)
    polmctl run recipe=grpo generation.cache=quantized generation.cache_nbits=8     # rollouts too
    polmctl chat outputs/lora/... --cache quantized --cache-nbits 4

The cache stores keys and values in ``cache_nbits`` bits, one scale and zero point per
``cache_group_size`` numbers (hqq, quanto: KIVI-style, Liu et al., 2024), or as float8 with one
scale per layer (fp8). The newest ``cache_residual_length`` tokens stay in full precision and are
quantized together each time that many have gathered; the prompt is quantized right after the
prefill. Attention still runs on dequantized keys and values: the cache saves memory, not time.

``generation_cache(model, settings)`` sets the model's generation config for the duration, so
every ``model.generate`` inside (evaluation, rollouts' ``TransformersBackend``, lm-eval) uses the
cache, and nothing of it is saved with the model. Rollouts then prefill each of a prompt's samples
itself: the shared prefill repeats a cache along the batch, which a quantized cache cannot.
Prompt and prefix tuning decode without a KV cache (``rollout.generate.decode_without_cache``).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from polmctl.config.schema import PROMPT_LEARNING, GenerationConfig
from polmctl.errors import ConfigError

BACKEND_PACKAGES = {"hqq": ("hqq", "hqq"), "quanto": ("optimum.quanto", "optimum-quanto")}  # import, pip name


def check_backend(settings: GenerationConfig, key: str = "generation.cache_backend") -> None:
    """A ConfigError naming the pip install when the quantized cache's backend is not installed."""
    if settings.cache != "quantized" or settings.cache_backend not in BACKEND_PACKAGES:
        return
    module, package = BACKEND_PACKAGES[settings.cache_backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (optimum) is missing
        found = False
    if not found:
        raise ConfigError(
            key,
            f"the quantized KV cache's {settings.cache_backend} backend is not installed: pip install {package} "
            "(or pip install 'polmctl[kvcache]'), or choose the fp8 backend (no extra package)",
        )


def check_generation_fits(run) -> None:
    """The cache setting against the rest of the run, at validation."""
    settings = run.generation
    if settings.cache != "quantized":
        return
    check_backend(settings)
    if run.peft.method in PROMPT_LEARNING:
        raise ConfigError(
            "generation.cache",
            f"peft.method={run.peft.method} decodes without a KV cache (polmctl.rollout.generate), so there "
            "is none to quantize; set generation.cache=dynamic",
        )
    if getattr(run.method, "generation_backend", "transformers") == "vllm":
        raise ConfigError(
            "generation.cache",
            "method.generation_backend=vllm keeps its own KV cache; set generation.cache=dynamic, or "
            "method.generation_backend=transformers",
        )


def cache_settings(settings: GenerationConfig | None) -> dict[str, Any] | None:
    """``generate``'s ``cache_implementation`` and ``cache_config`` for the settings; None: the default cache."""
    if settings is None or settings.cache != "quantized":
        return None
    config: dict[str, Any] = {"backend": settings.cache_backend}
    if settings.cache_backend != "fp8":  # fp8 is per tensor and refuses group-wise options
        config.update(
            nbits=settings.cache_nbits,
            q_group_size=settings.cache_group_size,
            residual_length=settings.cache_residual_length,
        )
    return {"cache_implementation": "quantized", "cache_config": config}


def _generation_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    return getattr(base, "generation_config", None)


def head_dim(model) -> int | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    return dim or (config.hidden_size // heads if heads else None)


def check_fits(model, settings: GenerationConfig) -> None:
    """hqq and quanto cut the cached keys and values into groups of cache_group_size numbers; a group
    that does not divide the head dim fails at some sequence lengths and not others, so it is refused."""
    dim = head_dim(model)
    if settings.cache_backend != "fp8" and dim and dim % settings.cache_group_size:
        divisors = [d for d in (8, 16, 32, 64, 128) if dim % d == 0]
        raise ConfigError(
            "generation.cache_group_size",
            f"{settings.cache_group_size} does not divide the model's head dim {dim}; use one that does, "
            f"e.g. {divisors[-1] if divisors else dim}",
        )


@contextmanager
def generation_cache(model, settings: GenerationConfig | None) -> Iterator[None]:
    """For the duration, every ``model.generate`` uses the cache of ``settings`` (nothing changes for dynamic)."""
    kwargs = cache_settings(settings)
    config = _generation_config(model) if kwargs else None
    if config is None:
        yield
        return
    check_fits(model, settings)
    saved = {k: getattr(config, k, None) for k in kwargs}
    for key, value in kwargs.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _stored_bytes(value: Any, seen: set[int]) -> int:
    """Bytes of the plain tensors inside ``value``: a tensor, a tensor subclass (quanto's packed
    tensors, through ``__tensor_flatten__``), or tuples / lists / dicts of them (hqq's (data, meta))."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
            names, _ = value.__tensor_flatten__()
            return sum(_stored_bytes(getattr(value, n), seen) for n in names)
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_stored_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_stored_bytes(v, seen) for v in value.values())
    return 0


def cache_bytes(cache) -> int:
    """Bytes a KV cache holds: every tensor its layers keep (full-precision keys and values, quantized
    data, scales and zero points, the residual window), each counted once."""
    seen: set[int] = set()
    return sum(_stored_bytes(vars(layer), seen) for layer in cache.layers)
