"""Merge several models into one model dir, one tensor at a time.

    polmctl run recipe=merge "method.models=[<run dir A>,<run dir B>]" method.merge=ties

``merge_models`` opens every input lazily (``polmctl.merge.sources``), checks that they fit
together (architecture, tensor names and shapes, tokenizer) before anything is written, then
reads one tensor of each input, merges it (``polmctl.merge.methods``) and hands it to a shard
writer, so memory holds the inputs' current tensors plus one output shard.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError, ModelError
from polmctl.merge.methods import TASK_VECTOR_MERGES, merge_tensor
from polmctl.merge.sources import FullModel, LoraAdapter, open_model
from polmctl.merge.write import ShardWriter
from polmctl.models import load_tokenizer

# config.json keys that must agree for two models' weights to mean the same thing.
ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


def merge_models(m, out_dir: Path, *, seed: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Write the merged model into ``out_dir`` (atomically: a temp dir renamed into place) and
    return what was merged: inputs, weights, base, tensor count, bytes."""
    if len(m.models) < 2:
        raise ConfigError(
            "method.models",
            f'needs at least two models to merge, got {len(m.models)}: "method.models=[<run dir A>,<run dir B>]"',
        )
    weights = m.model_weights()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with ExitStack() as stack:
            bases: dict[str, FullModel] = {}
            sources = [
                open_model(p, f"method.models[{i}] ({p})", stack, cache_dir, bases) for i, p in enumerate(m.models)
            ]
            base = _base(m, sources, stack, cache_dir, bases)
            names = check_compatible(sources, base)
            check_tokenizers(m.models, cache_dir)
            writer = ShardWriter(tmp, m.max_shard_mb * 2**20)
            out_dtype = None if m.dtype == "auto" else getattr(torch, m.dtype)
            with torch.random.fork_rng(devices=[]):  # DARE's random drops: reproducible by the run seed
                torch.manual_seed(seed)
                for name in names:
                    writer.add(name, _merged(m, name, sources, base, weights, out_dtype))
            files = writer.close()
            _write_config(sources[0], tmp, out_dtype)
        load_tokenizer(ModelConfig(name_or_path=m.models[0], cache_dir=cache_dir)).save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "models": [str(s.path) for s in sources],
        "kinds": [_kind(s) for s in sources],
        "weights": weights,
        "base": str(base.path) if base is not None else None,
        "tensors": len(names),
        "weights_bytes": writer.total_bytes,
        "files": [f.name for f in files],
    }


def _base(m, sources: list, stack: ExitStack, cache_dir: str | None, bases: dict[str, FullModel]) -> FullModel | None:
    """The model task vectors are taken from: method.base, else the one base of the LoRA inputs."""
    if m.merge not in TASK_VECTOR_MERGES:
        return None
    if m.base is not None:
        base = open_model(m.base, f"method.base ({m.base})", stack, cache_dir, bases)
        if isinstance(base, LoraAdapter):
            raise ConfigError(
                "method.base",
                f"{m.base} is a LoRA adapter; the base must be a full model (the model the adapters were trained on)",
            )
        return base
    adapter_bases = sorted({str(s.base.path) for s in sources if isinstance(s, LoraAdapter)})
    if not adapter_bases:
        raise ConfigError(
            "method.base",
            f"merge={m.merge} subtracts a base model from every input; none of "
            "method.models is a LoRA adapter that names one: set method.base=<the "
            "model they were fine-tuned from>",
        )
    if len(adapter_bases) > 1:
        raise ConfigError(
            "method.base",
            f"the LoRA adapters name different bases ({', '.join(adapter_bases)}); "
            "set method.base to the one to take task vectors from",
        )
    return bases[adapter_bases[0]]


def check_compatible(sources: list, base: FullModel | None) -> list[str]:
    """The tensor names to merge; a ModelError names the first architecture key, tensor name or
    tensor shape on which an input (or the base) differs from method.models[0]."""
    first, others = sources[0], sources[1:] + ([base] if base is not None else [])
    for other in others:
        for key in ARCHITECTURE_KEYS:
            a, b = first.config.get(key), other.config.get(key)
            if a != b:
                raise ModelError(
                    f"{other.label}: config.json {key}={b!r}, {first.label} has {a!r}; merging needs "
                    "models of one architecture (fine-tuned from the same base)"
                )
    names = first.names()
    for other in others:
        theirs = set(other.names())
        missing = [n for n in names if n not in theirs]
        extra = sorted(theirs - set(names))
        if missing or extra:
            where = f"has no tensor {missing[0]}" if missing else f"has a tensor {extra[0]} that"
            raise ModelError(
                f"{other.label} {where}"
                + ("" if missing else f" {first.label} has not")
                + f" ({len(missing)} missing, {len(extra)} extra); merging needs the same tensors"
            )
        for name in names:
            if other.shape(name) != first.shape(name):
                raise ModelError(
                    f"{other.label}: tensor {name} has shape {other.shape(name)}, {first.label} has "
                    f"{first.shape(name)}; merging needs the same shapes"
                )
    return names


def check_tokenizers(models: list[str], cache_dir: str | None) -> None:
    """Merged weights only make sense if every input maps the same text to the same token ids."""
    tokenizers = [load_tokenizer(ModelConfig(name_or_path=p, cache_dir=cache_dir)) for p in models]
    vocab = tokenizers[0].get_vocab()
    for i, tok in enumerate(tokenizers[1:], start=1):
        other = tok.get_vocab()
        if other != vocab:
            differ = sorted(set(vocab.items()) ^ set(other.items()), key=lambda kv: kv[1])[0]
            raise ModelError(
                f"method.models[{i}] ({models[i]}): its tokenizer differs from method.models[0]'s "
                f"(first difference: token {differ[0]!r} id {differ[1]}); merge models that share "
                "a tokenizer"
            )


def _merged(
    m, name: str, sources: list, base: FullModel | None, weights: list[float], out_dtype: torch.dtype | None
) -> torch.Tensor:
    cache: dict[Path, torch.Tensor] = {}  # full-model tensors of this name, each read once

    def full(model: FullModel) -> torch.Tensor:
        if model.path not in cache:
            cache[model.path] = model.tensor(name)
        return cache[model.path]

    tensors = [s.tensor(name, full(s.base)) if isinstance(s, LoraAdapter) else full(s) for s in sources]
    source_dtype = sources[0].dtype(name)
    if not source_dtype.is_floating_point:  # integer buffers (none in most LMs) are not averaged
        return tensors[0]
    merged = merge_tensor(
        m.merge,
        tensors,
        weights,
        base=full(base) if base is not None else None,
        density=m.density,
        majority_sign_method=m.majority_sign_method,
        slerp_t=m.slerp_t,
    )
    return merged.to(out_dtype or source_dtype)


def _write_config(first, out_dir: Path, out_dtype: torch.dtype | None) -> None:
    """config.json (and generation_config.json) of the first input's model dir, with the dtype written."""
    src = first.base.path if isinstance(first, LoraAdapter) else first.path
    config = json.loads((src / "config.json").read_text())
    if out_dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = str(out_dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", out_dir / "generation_config.json")


def _kind(source) -> str:
    return f"LoRA adapter on {source.base.path}" if isinstance(source, LoraAdapter) else "full model"
