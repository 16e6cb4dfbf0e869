"""The edit runner: load -> pick requests -> measure -> locate -> edit -> measure -> save. No training.

    polmctl run recipe=edit                                      # ROME, builtin facts the model knows
    polmctl run recipe=edit method.algorithm=memit method.max_requests=10
    polmctl run recipe=edit method.requests=my_edits.jsonl method.layer=6

Writes into the run dir: final/ (the edited model, loads with from_pretrained), edits.jsonl (the
requests applied), eval/edits-before.jsonl and eval/edits-after.jsonl (every prompt's scores) and
summary.json: the layer(s) edited (with the causal trace when it chose them), each edited
weight's change (norm, rank), the value optimisation, efficacy / generalisation / specificity
before and after, how far the neighbours' next-token distributions moved, perplexity on held-out
text before and after (fluency), and the run's eval tasks before/after.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.data import load_rows
from polmctl.data.sources import FILE_TYPES
from polmctl.editing import evaluate as E
from polmctl.editing.facts import known
from polmctl.editing.hooks import check_layer, mlp_down, num_layers
from polmctl.editing.memit import memit_edit
from polmctl.editing.memory import (
    ValueSettings,
    check_calibration,
    context_prefixes,
    key_second_moments,
)
from polmctl.editing.requests import BUILTIN, EditRequest, load_requests, locate_subject
from polmctl.editing.rome import rome_edit
from polmctl.editing.trace import causal_trace, editable_layers
from polmctl.engine.device import run_device
from polmctl.engine.metrics import peak_memory_mb
from polmctl.errors import ConfigError, DataError, ModelError
from polmctl.evals import evaluate_run
from polmctl.evals.perplexity import perplexity
from polmctl.models import is_reward_model, load_model, load_tokenizer, save_model
from polmctl.runners.common import begin, calibration_batches, eval_rows, finish


def run_edit(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    m = cfg.method
    run_dir = begin(
        cfg,
        "edit",
        no_adapters="knowledge editing writes into the weights and trains no adapters; use peft=none",
        full_precision="knowledge editing needs full-precision weights; use model.quantization=none",
    )

    # Requests and data first: a bad row or column fails here, before any weights load.
    requests = load_requests(m.requests, m.requests_split, seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    batches, cal_rows = calibration_batches(cfg, tokenizer)
    fluency_source, fluency_rows = _fluency_rows(cfg)
    model = load_model(
        cfg.model, device=run_device(cfg.trainer), for_training=False, pad_token_id=tokenizer.pad_token_id
    )
    _check_model(model, cfg.model.name_or_path)

    candidates = len(requests)
    known_count = None
    if m.requests == BUILTIN and m.known_only:
        with console.status(f"which of the {candidates} builtin facts {cfg.model.name_or_path} answers"):
            keep = known(model, tokenizer, requests, batch_size=m.batch_size)
        requests = [r for r, k in zip(requests, keep) if k]
        known_count = len(requests)
        if not requests:
            raise DataError(
                f"{BUILTIN}: {cfg.model.name_or_path} answers none of the {candidates} facts before editing (a random "
                "model knows none); set method.known_only=false to edit them anyway, or use a model that knows them"
            )
    requests = requests[: m.max_requests]
    if m.algorithm == "rome" and len(requests) > 1:
        console.print(f"[bold]rome[/] {len(requests)} requests, applied one after another (memit edits a batch)")

    before_eval = evaluate_run(cfg, model, tokenizer, run_dir, "before") if cfg.eval.before else None
    with console.status(f"measuring {len(requests)} requests before the edit"):
        # A request without target_true is measured against what the model answers before the edit.
        missing = [r for r in requests if r.target_true is None]
        greedy = iter(E.greedy_answers(model, tokenizer, missing) if missing else [])
        old = [r.target_true if r.target_true is not None else next(greedy) for r in requests]
        before = E.measure(model, tokenizer, requests, old, batch_size=m.batch_size)
        neighbours = E.neighbour_prompts(requests)
        neighbours_before = E.next_token_logprobs(model, tokenizer, neighbours, batch_size=m.batch_size)
        fluency_before = perplexity(model, tokenizer, fluency_rows, batch_size=m.batch_size)["metrics"]

    layers, trace = _layers(cfg, model, tokenizer, requests)
    _check_layers(model, tokenizer, requests, layers, m)
    with console.status(f"second moment of the keys of layer(s) {layers} on {cal_rows} rows of {cfg.data.source}"):
        covs, cal_tokens = key_second_moments(model, layers, batches)
    check_calibration(cal_tokens, mlp_down(model, layers[0]).in_features)
    prefixes = context_prefixes(model, tokenizer, m.num_prefixes, m.prefix_tokens, cfg.seed)
    settings = ValueSettings(
        steps=m.v_steps,
        lr=m.v_lr,
        weight_decay=m.v_weight_decay,
        kl_factor=m.kl_factor,
        clamp_norm_factor=m.clamp(),
        fact_token=m.fact_token,
    )

    original = {i: mlp_down(model, i).weight.detach().clone() for i in layers}
    edit_started = time.perf_counter()
    with console.status(f"{m.algorithm}: writing {len(requests)} request(s) into layer(s) {layers}"):
        if m.algorithm == "rome":
            updates = [
                rome_edit(model, tokenizer, r, layers[0], covs[layers[0]], prefixes, settings, m.batch_size)
                for r in requests
            ]
            values = [_value_row(r, u.value.losses, u.value.prob_target) for r, u in zip(requests, updates)]
            memit = None
        else:
            weight = m.update_weight if m.update_weight is not None else float(mlp_down(model, layers[0]).in_features)
            result = memit_edit(model, tokenizer, requests, layers, covs, prefixes, settings, weight, m.batch_size)
            values = [_value_row(r, None, p) for r, p in zip(requests, result.target_probs)]
            memit = {
                "update_weight": weight,
                "residual_before": [u.residual_before for u in result.updates],
                "residual_after": result.residual_after,
            }
    edit_time = time.perf_counter() - edit_started

    with console.status("measuring the edited model"):
        after = E.measure(model, tokenizer, requests, old, batch_size=m.batch_size)
        drift = E.drift(neighbours_before, E.next_token_logprobs(model, tokenizer, neighbours, batch_size=m.batch_size))
        fluency_after = perplexity(model, tokenizer, fluency_rows, batch_size=m.batch_size)["metrics"]
    save_model(model, tokenizer, run_dir / "final")
    after_eval = evaluate_run(cfg, model, tokenizer, run_dir, "after")
    _write_records(run_dir, requests, before, after)

    summary = {
        "recipe": cfg.recipe.name,
        "model": cfg.model.name_or_path,
        "run_dir": str(run_dir),
        "status": "completed",
        "algorithm": m.algorithm,
        "requests": {
            "source": m.requests,
            "candidates": candidates,
            "known_before": known_count,
            "applied": len(requests),
        },
        "layers": {
            "edited": layers,
            "chosen_by": "causal tracing" if trace else ("method.layers" if m.layers else "method.layer"),
            "trace": trace,
            "changes": _changes(model, original),
        },
        "values": values,
        "memit": memit,
        "edit": {"before": E.aggregate(before), "after": E.aggregate(after)},
        "neighbour_drift": drift,
        "fluency": {
            "source": fluency_source,
            "rows": len(fluency_rows),
            "perplexity_before": fluency_before["perplexity"],
            "perplexity_after": fluency_after["perplexity"],
        },
        "calibration": {"source": cfg.data.source, "rows": cal_rows, "tokens": cal_tokens},
        "prefixes": prefixes,
        "eval": {"before": before_eval, "after": after_eval},
        "edit_time_s": edit_time,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(next(model.parameters()).device),
    }
    return finish(run_dir, summary, f"{cfg.recipe.name} summary ({m.algorithm})", _table_rows(summary))


def _check_model(model, name: str) -> None:
    if is_reward_model(model):
        raise ModelError(f"{name} holds a reward model (a score head, no LM head); edit a causal LM")
    if hasattr(model, "peft_config"):
        raise ModelError(
            f"{name} holds a peft adapter; merge it first (polmctl export {name} --merge-adapters --out merged) "
            "and edit the merged model"
        )


def _fluency_rows(cfg: RunConfig) -> tuple[str, list[dict]]:
    """Held-out text for perplexity: data.source's eval split (a single file has none)."""
    source = cfg.data.source
    if Path(source).suffix.lower() in FILE_TYPES or Path(source).is_file():
        raise ConfigError(
            "data.source",
            f"{source} is a single file, so it has no held-out split for the fluency perplexity; calibrate on "
            "a builtin or hub source with an eval split (e.g. data=domain_text)",
        )
    rows = load_rows(
        source,
        cfg.data.eval_split,
        max_rows=cfg.method.fluency_rows,
        options=dict(cfg.data.options) or None,
        hub_config=cfg.data.hub_config,
    )
    return f"{source} ({cfg.data.eval_split})", rows


def _layers(cfg: RunConfig, model, tokenizer, requests: list[EditRequest]) -> tuple[list[int], dict | None]:
    """The layers to edit (rome: one; memit: method.layers, or ``window`` layers ending at method.layer
    or at the traced layer) and the causal trace when it chose them."""
    m = cfg.method
    if m.layers:
        return list(m.layers), None
    if m.layer is not None:
        return _window(m, check_layer(model, m.layer, "method.layer")), None
    traced = requests[: m.trace_requests]
    with console.status(f"causal tracing over {len(traced)} request(s), {num_layers(model)} layers"):
        result = causal_trace(
            model,
            tokenizer,
            traced,
            samples=m.trace_samples,
            noise_scale=m.trace_noise,
            seed=cfg.seed,
            module=m.trace_module,
            fact_token=m.fact_token,
        )
    console.print(f"[bold]causal trace[/] layer {result.layer} (indirect effect {result.effects[result.layer]:.4g})")
    return _window(m, result.layer), {
        "module": result.module,
        "requests": len(traced),
        "effects": result.effects,
        "candidates": result.candidates,
        "p_clean": result.p_clean,
        "p_corrupted": result.p_corrupted,
        "noise_std": result.noise_std,
        "answers": result.answers,
    }


def _window(m, layer: int) -> list[int]:
    return [layer] if m.algorithm == "rome" else list(range(max(0, layer - m.window + 1), layer + 1))


def _check_layers(model, tokenizer, requests: list[EditRequest], layers: list[int], m) -> None:
    key, fact_token = ("method.layers" if m.layers else "method.layer"), m.fact_token
    for layer in layers:
        check_layer(model, layer, key)
    found = [locate_subject(tokenizer, r.prompt, r.subject, where=r.where, fact_token=fact_token) for r in requests]
    allowed = editable_layers(num_layers(model), any(f.position < len(f.ids) - 1 for f in found))
    if layers[-1] not in allowed:
        raise ConfigError(
            key,
            f"layer {layers[-1]} is the model's last: its state at the subject reaches no later token, so an edit "
            f"there changes no answer; use a layer up to {allowed[-1]} (or method.fact_token=last)",
        )


def _value_row(request: EditRequest, losses: list[float] | None, prob: float) -> dict[str, Any]:
    row: dict[str, Any] = {"subject": request.subject, "target_new": request.target_new, "prob_target": prob}
    if losses:
        row.update(loss_start=losses[0], loss_end=losses[-1], steps=len(losses))
    return row


@torch.no_grad()
def _changes(model, original: dict[int, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Each edited down_proj: the norm of its change, relative to the weight, and the change's rank."""
    out = {}
    for layer, before in original.items():
        delta = (mlp_down(model, layer).weight - before).float()
        out[str(layer)] = {
            "norm": float(delta.norm()),
            "relative": float(delta.norm() / before.float().norm()),
            "rank": int(torch.linalg.matrix_rank(delta.cpu())),
        }
    return out


def _write_records(run_dir: Path, requests: list[EditRequest], before: list[dict], after: list[dict]) -> None:
    (run_dir / "edits.jsonl").write_text("".join(json.dumps(r.as_row()) + "\n" for r in requests))
    (run_dir / "eval").mkdir(exist_ok=True)
    for tag, records in (("before", before), ("after", after)):
        (run_dir / "eval" / f"edits-{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _fmt(block: dict | None, key: str) -> str:
    value = (block or {}).get(key)
    return "-" if value is None else f"{value:.3g}"


def _table_rows(summary: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {"algorithm": summary["algorithm"]}
    req = summary["requests"]
    known_part = f", {req['known_before']} known before" if req["known_before"] is not None else ""
    rows["requests"] = f"{req['applied']} applied ({req['candidates']} in {req['source']}{known_part})"
    layers = summary["layers"]
    rows["layer(s)"] = f"{layers['edited']} ({layers['chosen_by']})"
    rows["update rank per layer"] = ", ".join(f"{k}: {v['rank']}" for k, v in layers["changes"].items())
    before, after = summary["edit"]["before"], summary["edit"]["after"]
    for block, label in (
        ("efficacy", "efficacy"),
        ("generalisation", "generalisation"),
        ("specificity", "specificity"),
    ):
        if after[block] is None:
            continue
        rows[f"{label} success"] = f"{_fmt(before[block], 'success')} -> {_fmt(after[block], 'success')}"
        rows[f"{label} exact match"] = f"{_fmt(before[block], 'exact_match')} -> {_fmt(after[block], 'exact_match')}"
    rows["P(target_new), edited prompt"] = (
        f"{_fmt(before['efficacy'], 'prob_target')} -> {_fmt(after['efficacy'], 'prob_target')}"
    )
    if summary["neighbour_drift"]:
        rows["neighbour KL (before || after)"] = summary["neighbour_drift"]["kl"]
    fl = summary["fluency"]
    rows["fluency: perplexity before -> after"] = f"{fl['perplexity_before']:.4g} -> {fl['perplexity_after']:.4g}"
    rows.update(eval_rows(summary["eval"]))
    rows["edit_time_s"] = summary["edit_time_s"]
    rows["wall_time_s"] = summary["wall_time_s"]
    return rows
