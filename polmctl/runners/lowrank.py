"""The lowrank runner: load -> evaluate -> calibrate -> factor -> save -> reload -> evaluate. No training.

    polmctl run recipe=lowrank                                        # ASVD, factors keep 80% of the parameters
    polmctl run recipe=lowrank method.param_ratio=0.6 method.modules=[mlp]
    polmctl run recipe=lowrank method.save_format=dense               # a standard model dir, no saving

Writes into the run dir: final/ (method.save_format=factored: polmctl's layout with two Linears per
compressed layer, which ``polmctl eval``/``chat``/``run model.name_or_path=`` load; dense: a standard
model dir), eval/*.jsonl and summary.json: parameters before/after, every layer's rank, break-even rank,
energy kept and relative weight error, perplexity on the calibration rows and the run's eval tasks
before (the source) and after (the model reloaded from final/, as every later command gets it).
"""

from __future__ import annotations

import time
from typing import Any

from polmctl.compress import lowrank as L
from polmctl.compress import prune as P
from polmctl.config.schema import ModelConfig, RunConfig
from polmctl.console import console
from polmctl.engine.device import run_device
from polmctl.engine.metrics import peak_memory_mb
from polmctl.evals import evaluate_run
from polmctl.models import load_model, load_tokenizer, save_model
from polmctl.runners.common import begin, calibration_batches, calibration_record, eval_rows, finish, plain_causal_lm


def run_lowrank(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    m = cfg.method
    run_dir = begin(
        cfg,
        "lowrank",
        no_adapters="low-rank compression trains no adapters; use peft=none (recipe=lowrank_heal heals after)",
        full_precision="the SVD needs full-precision weights; use model.quantization=none",
    )
    device = run_device(cfg.trainer)
    # Data first: a bad file or column fails here, before any model weights load.
    tokenizer = load_tokenizer(cfg.model)
    batches, n_rows = calibration_batches(cfg, tokenizer)
    model = plain_causal_lm(
        load_model(cfg.model, device=device, for_training=False, pad_token_id=tokenizer.pad_token_id), "compress"
    )
    P.check_prunable(model)
    linears = P.prunable_linears(model, m.modules)
    params_before = P.count_parameters(model)

    before = evaluate_run(cfg, model, tokenizer, run_dir, "before") if cfg.eval.before else None
    factor_started = time.perf_counter()
    with console.status(f"calibrating on {n_rows} rows of {cfg.data.source}"):
        cal = P.calibrate(model, batches, linears=linears if m.activation_aware else None)
    with console.status(f"truncated SVD of {len(linears)} layers"):
        layers = L.compress_linears(
            model,
            linears,
            rank_by=m.rank_by,
            energy=m.energy,
            param_ratio=m.param_ratio,
            act_norms=cal.act_norms if m.activation_aware else None,
            alpha=m.alpha,
        )
    factor_time = time.perf_counter() - factor_started
    params_factored = P.count_parameters(model)
    if m.save_format == "dense":
        L.densify(model)
    final = save_model(model, tokenizer, run_dir / "final")
    del model

    # Everything "after" is measured on the model as every later command loads it.
    model = load_model(
        ModelConfig(name_or_path=str(final), dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation),
        device=device,
        for_training=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    with console.status("perplexity of the compressed model on the calibration rows"):
        cal_after = P.calibrate(model, batches)
    after = evaluate_run(cfg, model, tokenizer, run_dir, "after")

    factored = {n: e for n, e in layers.items() if not e["kept_dense"]}
    summary = {
        "recipe": cfg.recipe.name,
        "model": cfg.model.name_or_path,
        "run_dir": str(run_dir),
        "status": "completed",
        "rank_by": m.rank_by,
        "target": m.param_ratio if m.rank_by == "params" else m.energy,
        "activation_aware": m.activation_aware,
        "save_format": m.save_format,
        "layers": layers,
        "layers_factored": len(factored),
        "layers_kept_dense": sorted(n for n, e in layers.items() if e["kept_dense"]),
        "params": {
            "before": params_before,
            "factored": params_factored,
            "after": P.count_parameters(model),
            "ratio": P.count_parameters(model) / params_before,
        },
        "mean_rank": sum(e["rank"] for e in factored.values()) / len(factored) if factored else None,
        "calibration": calibration_record(cfg, n_rows, cal, cal_after),
        "eval": {"before": before, "after": after},
        "factor_time_s": factor_time,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(next(model.parameters()).device),
    }
    return finish(run_dir, summary, f"{cfg.recipe.name} summary ({m.rank_by})", _table_rows(summary))


def _table_rows(summary: dict[str, Any]) -> dict[str, Any]:
    params, cal = summary["params"], summary["calibration"]
    rows: dict[str, Any] = {
        "rank by": f"{summary['rank_by']} {summary['target']}"
        + (" (activation-aware)" if summary["activation_aware"] else ""),
        "layers factored / kept dense": f"{summary['layers_factored']} / {len(summary['layers_kept_dense'])}",
        "mean rank": summary["mean_rank"],
        "params before -> after": f"{params['before']:,} -> {params['after']:,} ({params['ratio']:.3f})",
        "calibration ppl before -> after": f"{cal['perplexity_before']:.4g} -> {cal['perplexity_after']:.4g}",
    }
    rows.update(eval_rows(summary["eval"]))
    rows["factor_time_s"] = summary["factor_time_s"]
    rows["wall_time_s"] = summary["wall_time_s"]
    return rows
