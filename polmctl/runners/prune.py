"""The prune runner: load -> evaluate -> calibrate -> prune -> save -> evaluate. No training.

    polmctl run recipe=prune                                     # Wanda, 50% of every decoder Linear
    polmctl run recipe=prune method.criterion=nm                 # 2:4 semi-structured
    polmctl run recipe=prune method.criterion=depth method.layer_fraction=0.25

Writes into the run dir: final/ (loads with from_pretrained; pruned weights are stored as
zeros, dropped layers are gone from the weights and the config), eval/*.jsonl and
summary.json: the zero fraction of every pruned tensor and overall, the layers dropped with
their Block Influence, parameters before/after, perplexity on the calibration rows and the
run's eval tasks before/after. To fine-tune the result and keep its zeros, see
``polmctl.compress.sparsity``.
"""

from __future__ import annotations

import time
from typing import Any

from polmctl.compress import prune as P
from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.engine.device import run_device
from polmctl.engine.metrics import peak_memory_mb
from polmctl.evals import evaluate_run
from polmctl.models import load_model, load_tokenizer, save_model
from polmctl.runners.common import begin, calibration_batches, calibration_record, eval_rows, finish, plain_causal_lm


def run_prune(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    m = cfg.method
    run_dir = begin(
        cfg,
        "prune",
        no_adapters="pruning trains no adapters; use peft=none",
        full_precision="pruning needs full-precision weights; use model.quantization=none "
        "(quantize the pruned model afterwards)",
    )

    # Data first: a bad file or column fails here, before any model weights load.
    tokenizer = load_tokenizer(cfg.model)
    batches, n_rows = calibration_batches(cfg, tokenizer)
    model = plain_causal_lm(
        load_model(cfg.model, device=run_device(cfg.trainer), for_training=False, pad_token_id=tokenizer.pad_token_id),
        "prune",
    )
    P.check_prunable(model)
    layers_before = len(P.decoder_layers(model))
    params_before = P.count_parameters(model)
    k = P.layers_to_drop(layers_before, m.num_layers_to_drop, m.layer_fraction) if m.criterion == "depth" else 0
    linears = P.prunable_linears(model, m.modules) if m.criterion != "depth" else {}

    before = evaluate_run(cfg, model, tokenizer, run_dir, "before") if cfg.eval.before else None
    needs_norms = m.criterion == "wanda" or (m.criterion == "nm" and m.nm_score == "wanda")
    prune_started = time.perf_counter()
    with console.status(f"calibrating on {n_rows} rows of {cfg.data.source}"):
        cal = P.calibrate(
            model, batches, linears=linears if needs_norms else None, layer_importance=m.criterion == "depth"
        )
    dropped: list[dict[str, Any]] = []
    achieved: dict[str, float] = {}
    if m.criterion == "depth":
        drop = P.least_important(cal.layer_importance, k)
        P.drop_layers(model, drop)
        dropped = [{"index": i, "importance": cal.layer_importance[i]} for i in drop]
    else:
        achieved = P.prune_linears(
            linears,
            criterion=m.criterion,
            sparsity=m.sparsity,
            n=m.nm_n,
            m=m.nm_m,
            nm_score=m.nm_score,
            act_norms=cal.act_norms,
        )
    prune_time = time.perf_counter() - prune_started
    with console.status("perplexity of the pruned model on the calibration rows"):
        cal_after = P.calibrate(model, batches)
    save_model(model, tokenizer, run_dir / "final")
    after = evaluate_run(cfg, model, tokenizer, run_dir, "after")

    pruned = {name: module.weight for name, module in linears.items()}
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    total = sum(w.numel() for w in pruned.values())
    summary = {
        "recipe": cfg.recipe.name,
        "model": cfg.model.name_or_path,
        "run_dir": str(run_dir),
        "status": "completed",
        "criterion": m.criterion,
        "sparsity": None
        if m.criterion == "depth"
        else {
            "requested": (m.nm_m - m.nm_n) / m.nm_m if m.criterion == "nm" else m.sparsity,
            "pattern": f"{m.nm_n}:{m.nm_m}" if m.criterion == "nm" else "unstructured",
            "score": m.nm_score if m.criterion == "nm" else m.criterion,
            "overall": zeros / max(total, 1),
            "per_tensor": achieved,
        },
        "layers": {
            "before": layers_before,
            "after": len(P.decoder_layers(model)),
            "dropped": dropped,
            "importance": cal.layer_importance or None,
        },
        "params": {
            "before": params_before,
            "after": P.count_parameters(model),
            "nonzero_after": sum(int((p != 0).sum()) for p in {id(p): p for p in model.parameters()}.values()),
        },
        "calibration": calibration_record(cfg, n_rows, cal, cal_after),
        "eval": {"before": before, "after": after},
        "prune_time_s": prune_time,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(next(model.parameters()).device),
    }
    return finish(run_dir, summary, f"{cfg.recipe.name} summary ({m.criterion})", _table_rows(summary))


def _table_rows(summary: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {"criterion": summary["criterion"]}
    sparsity = summary["sparsity"]
    if sparsity:
        rows["sparsity requested"] = sparsity["requested"]
        rows["sparsity achieved"] = sparsity["overall"]
        rows["pruned tensors"] = len(sparsity["per_tensor"])
    layers = summary["layers"]
    if layers["dropped"]:
        rows["layers before -> after"] = f"{layers['before']} -> {layers['after']}"
        rows["layers dropped (BI)"] = ", ".join(f"{d['index']} ({d['importance']:.3g})" for d in layers["dropped"])
    params = summary["params"]
    rows["params before -> after"] = f"{params['before']:,} -> {params['after']:,}"
    rows["non-zero params after"] = f"{params['nonzero_after']:,}"
    cal = summary["calibration"]
    rows["calibration ppl before -> after"] = f"{cal['perplexity_before']:.4g} -> {cal['perplexity_after']:.4g}"
    rows.update(eval_rows(summary["eval"]))
    rows["prune_time_s"] = summary["prune_time_s"]
    rows["wall_time_s"] = summary["wall_time_s"]
    return rows
