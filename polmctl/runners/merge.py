"""The merge runner: merge method.models tensor by tensor into final/, then evaluate the merged
model (and, with eval.before, every source model) on the run's eval tasks. No training.

    polmctl run recipe=merge "method.models=[<lora run A>,<lora run B>]"                   # TIES
    polmctl run recipe=merge "method.models=[A,B]" method.merge=linear "method.weights=[0.7,0.3]"
    polmctl run recipe=merge "method.models=[A,B]" method.merge=dare_ties method.density=0.3
    polmctl run recipe=merge "method.models=[A,B]" method.merge=slerp method.slerp_t=0.3

Writes into the run dir: final/ (config, tokenizer, safetensors: loadable with
``from_pretrained``), eval/*.jsonl and summary.json:

  merge          what was merged: method, inputs (and their kinds), weights, base, tensors, bytes
  eval.merged    each eval task's metrics on the merged model, reloaded from final/
  eval.sources   the same for each input model (eval.before=true), keyed by its path
  merge_peak_rss_mb  the process's peak resident memory up to the end of the merge (memory-mapped
                 input pages that were read count too)
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import ModelConfig, RunConfig
from polmctl.console import console
from polmctl.engine.device import run_device
from polmctl.engine.metrics import peak_memory_mb
from polmctl.evals import evaluate_run
from polmctl.merge.merge import merge_models
from polmctl.models import load_model, load_tokenizer
from polmctl.runners.common import begin, finish


def run_merge(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    m = cfg.method
    run_dir = begin(
        cfg,
        "merge",
        no_adapters="merging trains no adapters; use peft=none",
        full_precision="merging reads full-precision weights; use model.quantization=none",
    )
    device = run_device(cfg.trainer)

    with console.status(f"merging {len(m.models)} models ({m.merge})"):
        merged = merge_models(m, run_dir / "final", seed=cfg.seed, cache_dir=cfg.model.cache_dir)
    merge_time = time.perf_counter() - started
    merge_memory = peak_memory_mb(torch.device("cpu"))  # merging runs on CPU; before any model is loaded

    sources = {}
    if cfg.eval.tasks and cfg.eval.before:
        for i, path in enumerate(m.models):
            sources[path] = _evaluate(cfg, path, device, run_dir, f"source-{i}")
    final = run_dir / "final"
    after = _evaluate(cfg, str(final), device, run_dir, "merged") if cfg.eval.tasks else None

    summary = {
        "recipe": cfg.recipe.name,
        "run_dir": str(run_dir),
        "status": "completed",
        "merge": m.merge,
        "merged_dir": str(final),
        **merged,
        "density": m.density if m.merge in ("ties", "dare_linear", "dare_ties") else None,
        "slerp_t": m.slerp_t if m.merge == "slerp" else None,
        "eval": {"merged": after, "sources": sources or None},
        "merge_time_s": merge_time,
        "merge_peak_rss_mb": merge_memory,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(torch.device(device)),
    }
    return finish(run_dir, summary, f"{cfg.recipe.name} summary ({m.merge})", _table_rows(summary))


def _evaluate(cfg: RunConfig, path: str, device: str, run_dir: Path, tag: str) -> dict | None:
    model_cfg = ModelConfig(
        name_or_path=path,
        dtype=cfg.model.dtype,
        cache_dir=cfg.model.cache_dir,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, device=device, for_training=False, pad_token_id=tokenizer.pad_token_id)
    results = evaluate_run(cfg, model, tokenizer, run_dir, tag)
    del model
    gc.collect()
    return results


def _table_rows(summary: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {"merge": summary["merge"], "base": summary["base"] or "-"}
    for i, (path, weight) in enumerate(zip(summary["models"], summary["weights"])):
        rows[f"model {i} (weight {weight:.3g})"] = path
    rows["tensors"] = f"{summary['tensors']} ({summary['weights_bytes'] / 2**20:.1f} MB)"
    sources = summary["eval"]["sources"] or {}
    for task, metrics in (summary["eval"]["merged"] or {}).items():
        for metric, value in metrics.items():
            if metric in ("n", "tokens"):
                continue
            before = [f"{s.get(task, {}).get(metric, float('nan')):.4g}" for s in sources.values()]
            rows[f"{task}/{metric}" + (" sources -> merged" if before else "")] = (
                " / ".join(before) + " -> " if before else ""
            ) + f"{value:.4g}"
    rows["merge_time_s"] = summary["merge_time_s"]
    rows["merge peak RSS"] = f"{summary['merge_peak_rss_mb']:.0f} MB"
    rows["wall_time_s"] = summary["wall_time_s"]
    return rows
