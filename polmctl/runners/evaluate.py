"""The evaluate runner: load a model (or a run dir's final/), run the eval tasks, write summary.json.

polmctl eval outputs/lora/2026-11-24/10-00-00
polmctl eval model=smollm2-135m eval.tasks=[arithmetic,perplexity]
polmctl eval builtin:smollm2-135m generation.cache=quantized generation.cache_nbits=4
"""

from __future__ import annotations

import time
from typing import Any

from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.engine.device import run_device
from polmctl.evals import run_evals
from polmctl.models import load_model, load_tokenizer
from polmctl.rollout.cache import generation_cache
from polmctl.runners.common import begin, finish


def run_evaluate(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = begin(cfg, "evaluate")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(
        cfg.model, device=run_device(cfg.trainer), for_training=False, pad_token_id=tokenizer.pad_token_id
    )
    evaluating = console.status(f"evaluating {cfg.model.name_or_path}: {', '.join(cfg.eval.tasks)}")
    with evaluating, generation_cache(model, cfg.generation):  # generation.cache=quantized: its KV cache
        results = run_evals(model, tokenizer, cfg.eval, cfg.data, run_dir / "eval")
    summary = {
        "model": cfg.model.name_or_path,
        "run_dir": str(run_dir),
        "status": "completed",
        "wall_time_s": time.perf_counter() - started,
        "eval": results,
    }
    return finish(
        run_dir,
        summary,
        f"eval: {cfg.model.name_or_path}",
        {f"{task}/{k}": v for task, m in results.items() for k, v in m.items()},
    )
