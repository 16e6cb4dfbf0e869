"""The quantize runner: load -> measure + evaluate -> quantize -> save -> reload -> measure + evaluate.
No training.

    polmctl run recipe=quantize                                  # SmolLM2, bitsandbytes nf4
    polmctl run recipe=quantize method.scheme=int8
    polmctl run recipe=quantize method.scheme=cpu_int8           # torchao int8 weights (pip install torchao)
    polmctl run recipe=quantize method.scheme=cpu_int4           # torchao int4, CPU (models/replaced.py layout)
    polmctl run recipe=quantize method.scheme=hqq                # HQQ 4-bit (pip install hqq)
    polmctl run recipe=quantize method.scheme=gptq               # GPTQ, calibrated on the run's data (GPTQModel)
    polmctl run recipe=quantize method.scheme=awq                # AWQ, the same
    polmctl run recipe=quantize model.name_or_path=outputs/lora/...   # a run dir; a LoRA adapter is merged first
    polmctl run recipe=quantize model.name_or_path=outputs/lora/... method.adapter=keep method.scheme=cpu_int4
                                  # QLoRA-style: the base quantized, the adapter unmerged over it (final/base/)

Writes into the run dir: final/ (the quantized model; ``from_pretrained`` and ``polmctl eval
<run dir>`` reload it quantized; with method.adapter=keep the adapter, over its quantized base in
final/base/), source/ only when the source has no local full-weights dir
(a hub id or an adapter dir: the merged source is saved there to be quantized and measured),
eval/*.jsonl and summary.json:

  size_on_disk_bytes   bytes of the weights files: the source's model dir (for builtin models
                       their cache dir; else source/) vs final/
  param_memory_bytes   bytes of parameters + buffers in memory, quantization state included
                       (``polmctl.compress.quantize.parameter_bytes``)
  tokens_per_s         greedy generation of the same held-out arithmetic prompts before and after
  eval                 the run's eval tasks (default: arithmetic exact match + perplexity) before
                       on the source model, after on the model reloaded from final/
each with before, after and ratio (after / before). The "after" numbers are measured on the
model reloaded from final/, i.e. what every later command gets.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from polmctl.compress import quantize as Q
from polmctl.config.schema import ModelConfig, RunConfig
from polmctl.console import console
from polmctl.engine.device import run_device
from polmctl.engine.metrics import peak_memory_mb
from polmctl.errors import ConfigError, ModelError
from polmctl.evals import evaluate_run
from polmctl.models import load_model, load_tokenizer, resolve_model_path, save_model
from polmctl.models.load import adapter_base
from polmctl.models.replaced import is_replaced_dir
from polmctl.models.save import save_adapter_over
from polmctl.runners.common import begin, calibration_examples, finish, plain_causal_lm


def run_quantize(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    m = cfg.method
    run_dir = begin(
        cfg,
        "quantize",
        no_adapters="quantizing trains no adapters; use peft=none",
        full_precision="the quantize recipe loads the source in full precision and takes the scheme "
        f"from method.scheme: use model.quantization=none method.scheme={cfg.model.quantization}",
    )
    device = torch.device(_device(cfg))
    Q.check_backend(m.scheme, device)  # a missing library fails here, before any weights load
    with Q.quiet_backends():
        return _run(cfg, m, device, run_dir, started)


def _run(cfg: RunConfig, m, device: torch.device, run_dir: Path, started: float) -> dict[str, Any]:
    name = cfg.model.name_or_path
    tokenizer = load_tokenizer(cfg.model)
    path = resolve_model_path(name, cfg.model.cache_dir)
    _refuse_quantized(name, Q.dir_quantization(path))  # before loading a model that may need other libraries
    if is_replaced_dir(path) and m.scheme not in Q.IN_PLACE_SCHEMES:
        raise ConfigError(
            "method.scheme",
            f"{name} holds low-rank factors (polmctl's layout), which {m.scheme} cannot load through "
            "from_pretrained; use method.scheme=hqq or cpu_int4, or save it with method.save_format=dense",
        )
    keep = m.adapter == "keep"
    base_path = adapter_base(path, cfg.model.cache_dir) if keep else None
    if keep and base_path is None:
        raise ConfigError(
            "method.adapter",
            f"keep quantizes an adapter's base and keeps the adapter; {name} holds no adapter "
            "(adapter_config.json): use method.adapter=merge",
        )
    dtype = Q.load_dtype(m, cfg.model.dtype, device)
    source = _plain_model(
        load_model(
            _with_dtype(cfg.model, dtype), device=device, for_training=False, pad_token_id=tokenizer.pad_token_id
        ),
        name,
        merge=not keep,
    )
    if Q.is_full_model_dir(path):
        source_dir = Path(path)
        size_from = "the builtin model's cache dir" if name.startswith("builtin:") else "the source model dir"
    else:  # a hub id (weights only in the hub cache) or an adapter dir (base + adapter, merged)
        source_dir = save_model(source, tokenizer, run_dir / "source", merge_adapters=keep)
        size_from = "a reference copy of the source saved in source/ (no local full-weights dir to measure)"
    prompts = Q.speed_prompts(tokenizer, m.speed_prompts)

    before = evaluate_run(cfg, source, tokenizer, run_dir, "before") if cfg.eval.before else None
    with console.status(f"tokens/s of the source model ({len(prompts)} prompts)"):
        speed_before = Q.generation_speed(
            source, tokenizer, prompts, max_new_tokens=m.speed_max_new_tokens, batch_size=m.speed_batch_size
        )
    memory_before = Q.parameter_bytes(source)
    del source
    gc.collect()

    calibration = None
    if m.scheme in Q.CALIBRATED_SCHEMES:
        calibration = [e["input_ids"] for e in calibration_examples(cfg, tokenizer)]
    quantize_started = time.perf_counter()
    with console.status(f"quantizing {name} ({m.scheme})"):
        quantized = Q.quantize_model(
            base_path or source_dir,  # keep: the adapter's base alone
            m,
            device=device,
            dtype=dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            calibration=calibration,
            work_dir=run_dir,  # GPTQModel's per-layer logs: <run dir>/logs/
        )
    if not Q.quantized_layers(quantized):
        raise ModelError(f"method.scheme={m.scheme} quantized no layer of {name} (no nn.Linear it could convert)")
    if keep:
        final = save_adapter_over(quantized, tokenizer, path, run_dir / "final")
    else:
        final = save_model(quantized, tokenizer, run_dir / "final")
    quantize_time = time.perf_counter() - quantize_started
    del quantized
    gc.collect()

    # Everything "after" is measured on the model as every later command loads it.
    model = load_model(
        _with_dtype(
            ModelConfig(
                name_or_path=str(final),
                trust_remote_code=cfg.model.trust_remote_code,
                attn_implementation=cfg.model.attn_implementation,
            ),
            dtype,
        ),
        device=device,
        for_training=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    layers = Q.quantized_layers(model)
    if not layers:
        raise ModelError(f"{final} reloaded without quantized layers; its config.json lost the quantization_config")
    with console.status(f"tokens/s of the quantized model ({len(prompts)} prompts)"):
        speed_after = Q.generation_speed(
            model, tokenizer, prompts, max_new_tokens=m.speed_max_new_tokens, batch_size=m.speed_batch_size
        )
    after = evaluate_run(cfg, model, tokenizer, run_dir, "after") if cfg.eval.tasks else None
    size_before, size_after = Q.weights_bytes(source_dir), Q.saved_bytes(final)
    memory_after = Q.parameter_bytes(model)

    summary = {
        "recipe": cfg.recipe.name,
        "model": name,
        "run_dir": str(run_dir),
        "status": "completed",
        "scheme": m.scheme,
        "adapter": m.adapter if base_path else None,
        "quantization": Q.model_quantization(model),
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantized_dir": str(final),
        "quantized_layers": dict(layers),
        "full_precision_linears": Q.full_precision_linears(model),
        "size_on_disk_bytes": {
            "before": size_before,
            "after": size_after,
            "ratio": Q.ratio(size_after, size_before),
            "before_measured_in": str(source_dir),
            "before_from": size_from,
        },
        "param_memory_bytes": {
            "before": memory_before,
            "after": memory_after,
            "ratio": Q.ratio(memory_after, memory_before),
        },
        "tokens_per_s": {
            "before": speed_before["tokens_per_s"],
            "after": speed_after["tokens_per_s"],
            "ratio": Q.ratio(speed_after["tokens_per_s"], speed_before["tokens_per_s"]),
        },
        "generation": {
            "prompts": len(prompts),
            "source": "builtin:arithmetic (test split)",
            "greedy": True,
            "max_new_tokens": m.speed_max_new_tokens,
            "batch_size": m.speed_batch_size,
            "before": {k: speed_before[k] for k in ("tokens", "seconds")},
            "after": {k: speed_after[k] for k in ("tokens", "seconds")},
            "identical_completions": sum(
                a == b for a, b in zip(speed_before["completions"], speed_after["completions"])
            ),
        },
        "eval": {"before": before, "after": after},
        "calibration": None
        if calibration is None
        else {"source": cfg.data.source, "split": cfg.data.split, "rows": len(calibration)},
        "quantize_time_s": quantize_time,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(device),
    }
    return finish(run_dir, summary, f"{cfg.recipe.name} summary ({m.scheme})", _table_rows(summary))


def _refuse_quantized(name: str, quantization: str | None) -> None:
    if quantization:
        raise ConfigError(
            "model.name_or_path",
            f"{name} is already quantized ({quantization}); quantizing it "
            "again is not supported: point model.name_or_path at the "
            "full-precision model it was made from",
        )


def _plain_model(model, name: str, *, merge: bool):
    """A full-precision causal LM: a quantized source, a reward model or a prompt-learning adapter is refused,
    another adapter is merged into its base (kept unmerged with ``merge=False``: method.adapter=keep)."""
    _refuse_quantized(name, Q.model_quantization(model))  # e.g. an adapter on a quantized base
    return plain_causal_lm(
        model, "quantize", error=lambda message: ConfigError("model.name_or_path", message), merge=merge
    )


def _with_dtype(model_cfg: ModelConfig, dtype: torch.dtype) -> ModelConfig:
    from dataclasses import replace

    return replace(model_cfg, dtype=str(dtype).removeprefix("torch."))


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _table_rows(summary: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {
        "scheme": f"{summary['scheme']} ({summary['quantization']})",
        "quantized layers": ", ".join(f"{n} {k}" for k, n in summary["quantized_layers"].items()),
    }
    for key, label, fmt in (
        ("size_on_disk_bytes", "size on disk", _mb),
        ("param_memory_bytes", "param memory", _mb),
        ("tokens_per_s", "tokens/s", lambda v: f"{v:.1f}"),
    ):
        entry = summary[key]
        rows[f"{label} before -> after"] = f"{fmt(entry['before'])} -> {fmt(entry['after'])}"
        rows[f"{label} ratio"] = entry["ratio"]
    gen = summary["generation"]
    rows["identical greedy completions"] = f"{gen['identical_completions']} of {gen['prompts']}"
    before, after = summary["eval"]["before"] or {}, summary["eval"]["after"] or {}
    for task, metrics in after.items():
        for metric, value in metrics.items():
            if metric not in ("n", "tokens"):
                old = before.get(task, {}).get(metric)
                rows[f"{task}/{metric} before -> after"] = f"{'-' if old is None else f'{old:.4g}'} -> {value:.4g}"
    rows["quantize_time_s"] = summary["quantize_time_s"]
    rows["wall_time_s"] = summary["wall_time_s"]
    return rows


def _device(cfg: RunConfig) -> str:
    if cfg.method.scheme in Q.CPU_SCHEMES and cfg.trainer.device == "auto":
        return "cpu"  # the scheme is for CPU inference; on GPUs use int8 / nf4 / hqq
    return run_device(cfg.trainer)
