"""Load a tokenizer and a causal LM from builtin:<name>, a hub id, a local dir or a run dir.

    polmctl run recipe=lora model.name_or_path=HuggingFaceTB/SmolLM2-360M-Instruct
    polmctl run recipe=qlora model.quantization=nf4 model.dtype=bfloat16
    polmctl eval outputs/lora/2026-11-24/10-00-00       # a run dir loads its final/
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from polmctl.config.schema import ModelConfig
from polmctl.models.builtin import materialise_builtin
from polmctl.models.errors import ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """builtin:<name> -> its cache dir; a run dir -> its final/; a model dir or hub id as is."""
    if name_or_path.startswith("builtin:"):
        return str(materialise_builtin(name_or_path.split(":", 1)[1], cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "final").is_dir():
            return str(path / "final")
        if (path / "config.json").exists() or (path / "adapter_config.json").exists():
            return str(path)
        raise ModelError(f"{name_or_path} is a directory but holds no model (no config.json, "
                         "adapter_config.json or final/); point model.name_or_path at a model or run dir")
    if HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/", "~")):
        return name_or_path
    raise ModelError(f"model {name_or_path!r} not found: not a local dir, not builtin:<name>, not a hub id "
                     "(org/name); builtin models are builtin:smollm2-135m and builtin:tiny")


def _hub_call(fn, name: str, **kwargs):
    try:
        return fn(name, **kwargs)
    except (OSError, ValueError) as err:
        if Path(name).exists():
            raise
        raise ModelError(f"cannot load {name!r} from the hub ({type(err).__name__}): the hub is unreachable "
                         "or the id is wrong; use a local dir or builtin:smollm2-135m") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path, cfg.cache_dir)
    tok = _hub_call(AutoTokenizer.from_pretrained, path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.chat_template:
        template = Path(cfg.chat_template).expanduser()
        tok.chat_template = template.read_text() if template.is_file() else cfg.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(f"model.quantization={cfg.quantization} needs bitsandbytes: pip install bitsandbytes") from None
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=cfg.double_quant)


def load_model(cfg: ModelConfig, *, device: torch.device | str = "cpu", for_training: bool = True):
    """A causal LM on ``device``; a dir holding a peft adapter loads its base, then the adapter."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path = resolve_model_path(cfg.name_or_path, cfg.cache_dir)
    adapter = Path(path) / "adapter_config.json"
    base_path = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.exists() else path
    dtype = resolve_dtype(cfg.dtype, device)
    quant = quantization_config(cfg, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device.index or 0} if device.type == "cuda" else "cpu")
    model = _hub_call(AutoModelForCausalLM.from_pretrained, base_path, **kwargs)
    if quant is None:
        model.to(device)
    if quant is not None and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path, is_trainable=for_training)
    if not for_training:
        model.eval()
    return model


def load_model_and_tokenizer(cfg: ModelConfig, *, device: torch.device | str = "cpu", for_training: bool = True):
    return load_model(cfg, device=device, for_training=for_training), load_tokenizer(cfg)
