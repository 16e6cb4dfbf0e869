"""``polmctl export``: a run, a checkpoint or a model as a standalone Hugging Face model dir or a GGUF file.

    polmctl export outputs/lora/2026-11-24/10-00-00 --merge-adapters --dtype bfloat16 --out exported/lora
    polmctl export outputs/lora/2026-11-24/10-00-00/checkpoints/step-40 --merge-adapters --out exported/step-40
    polmctl export outputs/lora/2026-11-24/10-00-00 --merge-adapters --format gguf --gguf-type q8_0 --out lora.gguf
    polmctl export exported/lora --out exported/lora-bf16 --dtype bfloat16 --push-to-hub me/smollm2-lora
    polmctl export outputs/sft/2026-12-03/10-00-00/checkpoints/step-40 --out exported/step-40   # sharded (FSDP2)

The source is a run dir (its final/), a checkpoint dir (checkpoints/step-N: the base model and
peft config come from the run's config as the checkpoint recorded it (its hydra/config.yaml, else
the run's .hydra/config.yaml), the trained weights from its trainable.safetensors, or from its
sharded/ dir when a sharded (FSDP2) run wrote it: torch.distributed.checkpoint's own format, whose
shards are read in this one process (no process group) into the model built from the run's config,
the .metadata file through a restricted unpickler and the .distcp files as tensors only
(engine/checkpoint.py); the optimizer shards and trainer_state.pt are never read), a model or
adapter dir, builtin:<name> or a hub id.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError, ModelError

FORMATS = ("hf", "gguf")
DTYPES = ("float32", "bfloat16", "float16")


def is_checkpoint_dir(path: Path) -> bool:
    from polmctl.engine.checkpoint import is_sharded_checkpoint

    weights = (path / "trainable.safetensors").is_file() or is_sharded_checkpoint(path)
    return weights and (path / "trainer_state.pt").is_file()


def _check_request(source: str, out: Path, fmt: str, dtype: str | None, push_to_hub: str | None) -> None:
    if fmt not in FORMATS:
        raise ModelError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if fmt == "gguf" and out.suffix != ".gguf":
        raise ModelError(f"--out {out}: a GGUF export is one file; give a path ending in .gguf")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise ModelError(f"--out {out} already exists; choose a new path or delete it first")
    if push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ModelError(
                f"--push-to-hub {push_to_hub}: the hub is switched off here (HF_HUB_OFFLINE=1); "
                "export without --push-to-hub and upload the result from a machine that reaches the hub"
            )


def load_checkpoint_model(ckpt: Path):
    """(model, tokenizer) of ``checkpoints/step-N``: the run's base model and adapters, with the
    checkpoint's trainable weights; a quantized base (QLoRA) is loaded in full precision."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from polmctl.engine.checkpoint import is_sharded_checkpoint, load_sharded_trainable, load_trainable
    from polmctl.methods.registry import build_objective, method_spec
    from polmctl.models import apply_peft, load_model, load_tokenizer
    from polmctl.validate import upgrade_recorded, validate

    run_dir = ckpt.resolve().parent.parent
    saved = ckpt / "hydra" / "config.yaml"  # the config the checkpoint was written under
    if not saved.is_file():
        saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ModelError(
            f"{ckpt} is a checkpoint, but its run's config {saved} is missing: the base model and "
            "peft config come from it; export the run's final/ or restore .hydra/"
        )
    cfg = upgrade_recorded(OmegaConf.load(saved))
    OmegaConf.set_struct(cfg, False)
    cfg.output_dir = str(run_dir)  # saved as ${hydra:runtime.output_dir}, which needs a live Hydra
    run = validate(cfg)
    spec = method_spec(run.method.name)
    if spec.objective is None:
        raise ModelError(
            f"{ckpt}: method {run.method.name} ({spec.runner} runner) checkpoints cannot be exported; "
            "export the run's final/"
        )
    model_cfg = replace(run.model, quantization="none", dtype="float32", gradient_checkpointing=False)
    tokenizer = (
        AutoTokenizer.from_pretrained(ckpt) if (ckpt / "tokenizer_config.json").is_file() else load_tokenizer(model_cfg)
    )
    objective = build_objective(run.method)
    model = load_model(model_cfg, for_training=True, head=objective.model_head, pad_token_id=tokenizer.pad_token_id)
    model = apply_peft(model, run.peft, tokenizer)
    heads = objective.heads(model)  # PPO's value head: loaded, then dropped
    for name, head in heads.items():
        model.add_module(name, head)
    try:
        if is_sharded_checkpoint(ckpt):  # an FSDP2 run's shards, put together in this one process
            load_sharded_trainable(ckpt, model)
        else:
            load_trainable(ckpt, model)  # the weights only (safetensors): trainer_state.pt is not needed, nor read
    except ValueError as err:
        raise ModelError(str(err)) from None
    for name in heads:
        delattr(model, name)
    model.eval().requires_grad_(False)
    return model, tokenizer


def load_source(source: str):
    """(model, tokenizer) for any source ``polmctl export`` accepts, in float32."""
    from polmctl.compress.quantize import dir_quantization
    from polmctl.models import load_model, load_tokenizer, resolve_model_path

    path = Path(source).expanduser()
    if path.is_dir() and is_checkpoint_dir(path):
        return load_checkpoint_model(path)
    resolved = resolve_model_path(source)
    quantized = dir_quantization(resolved)
    if quantized:
        raise ModelError(
            f"{resolved} holds a quantized model ({quantized}): it is already a standalone model dir "
            "(copy it as it is); GGUF and dtype exports start from full-precision weights, so export "
            "the run it was quantized from"
        )
    cfg = ModelConfig(name_or_path=source, dtype="float32")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, for_training=False, pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def merge_adapters(model):
    """The model with its LoRA/DoRA adapter merged into the weights (peft's merge_and_unload)."""
    config = model.active_peft_config
    kind = getattr(config.peft_type, "value", str(config.peft_type))
    if kind != "LORA":
        raise ModelError(
            f"--merge-adapters: a {kind} adapter cannot be merged into the weights (only lora and dora "
            "merge); export it without --merge-adapters (as an adapter dir)"
        )
    return model.merge_and_unload()


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed hub call raises: auth and HTTP errors, and the HTTP client's own network errors
    (huggingface_hub has used requests, httpx and httpx2 across versions)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [OSError, ValueError, HfHubHTTPError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push(path: Path, repo: str) -> str:
    """Upload the export to hub repo ``repo`` (created if missing); returns the repo URL."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        url = api.create_repo(repo, exist_ok=True, repo_type="model")
        if path.is_dir():
            api.upload_folder(repo_id=repo, folder_path=path, commit_message="polmctl export")
        else:
            api.upload_file(path_or_fileobj=path, path_in_repo=path.name, repo_id=repo, commit_message="polmctl export")
    except _hub_errors() as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(
            f"--push-to-hub {repo} failed ({type(err).__name__}: {reason}); the export itself is in "
            f"{path}: upload it later with `hf upload {repo} {path}`"
        ) from None
    return str(url)


def export(
    source: str,
    out: str | Path,
    *,
    fmt: str = "hf",
    merge: bool = False,
    dtype: str | None = None,
    gguf_type: str = "f16",
    push_to_hub: str | None = None,
) -> dict:
    """Write the export; returns what was written (for the command's summary)."""
    from peft import PeftModel

    from polmctl.commands.gguf_export import GGUF_TYPES, write_gguf
    from polmctl.models import save_model

    out = Path(out)
    _check_request(source, out, fmt, dtype, push_to_hub)
    if fmt == "gguf" and gguf_type not in GGUF_TYPES:
        raise ModelError(f"--gguf-type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    model, tokenizer = load_source(source)
    adapter = isinstance(model, PeftModel)
    if adapter and merge:
        model, adapter = merge_adapters(model), False
    elif adapter and fmt == "gguf":
        raise ModelError("GGUF holds one full model, not a peft adapter: add --merge-adapters (lora and dora merge)")
    if dtype is not None:
        model.to(getattr(torch, dtype))
    if fmt == "gguf":
        write_gguf(model, tokenizer, out, outtype=gguf_type, name=Path(source.rstrip("/")).name)
    else:
        save_model(model, tokenizer, out)
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    result = {
        "source": source,
        "out": str(out),
        "format": "gguf " + gguf_type if fmt == "gguf" else "hf",
        "contents": "peft adapter (not merged)" if adapter else "full model",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": size,
    }
    if push_to_hub:
        result["pushed_to"] = push(out, push_to_hub)
    return result


EXPORT_ERRORS = (ModelError, ConfigError, FileNotFoundError)  # shown as one line by the command
