"""The train runner: data -> model (+adapters) -> evaluate -> train -> save -> evaluate.

    polmctl run recipe=lora                        # any offline recipe ends up here
    polmctl run recipe=sft model=tiny trainer=debug

Writes into the run dir: metrics.jsonl, checkpoints/step-N/ (each with run_config.yaml: a resume
with another model, peft or method is refused), final/ (with peft.merge_on_save=true the merged
model, and adapter/ the adapter alone), eval/*.jsonl, summary.json (final
metrics, evaluation before/after, wall time, peak memory, tokens/s, the distribution strategy
that ran). With several processes rank 0 evaluates and writes final/; under a sharded strategy
(FSDP2, ZeRO-3) every rank first takes part in gathering the whole weights onto rank 0.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from polmctl.compress.sparsity import SparsityMasks
from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.data import load_config_rows
from polmctl.engine.checkpoint import resolve_resume
from polmctl.engine.device import keep_until_exit, make_accelerator, whole_model
from polmctl.engine.metrics import peak_memory_mb
from polmctl.engine.trainer import Trainer
from polmctl.evals import evaluate_run
from polmctl.methods.reference import Reference
from polmctl.methods.registry import build_objective, method_spec
from polmctl.models import apply_peft, cache_root, load_model, load_tokenizer, save_model, trainable_parameter_summary
from polmctl.models.peft_variants import step_hooks, step_penalties
from polmctl.rollout.cache import generation_cache
from polmctl.runners.common import check_resume, eval_rows, finish, run_record


def run_train(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    objective = build_objective(cfg.method)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    acc = make_accelerator(cfg.trainer, cfg.logger, run_dir)
    run_dir = Path(acc.project_dir)  # several processes: rank 0's run dir, on every rank
    resume = resolve_resume(cfg.resume, run_dir)
    record = run_record(cfg, run_dir)  # kept in every checkpoint
    if resume is not None:
        check_resume(resume, cfg, run_dir)  # another model or peft shape: refused before anything loads

    # ZeRO-3 partitions the policy when the trainer prepares it, not as it loads; a model the data loads
    # (builtin:facts' data.options.known_by answers its questions) is whole on every rank too.
    with whole_model(acc):
        # Data first: a bad file or column fails here, before any model weights load.
        tokenizer = load_tokenizer(cfg.model)
        rows = load_config_rows(cfg.data)
        examples, stats = objective.encode(rows, tokenizer, cfg.data)
        console.print(f"[bold]data[/] {cfg.data.source}: {stats.summary()}")

        model = load_model(
            cfg.model,
            device=acc.device,
            for_training=True,
            head=objective.model_head,
            pad_token_id=tokenizer.pad_token_id,
        )
    model = apply_peft(model, cfg.peft, tokenizer, examples=examples, total_steps=cfg.trainer.max_steps)
    # Modules that train beside the model (PPO's value head): attached, they are optimised,
    # checkpointed and resumed with it; the final model is saved without them.
    heads = objective.heads(model)
    for name, head in heads.items():
        model.add_module(name, head)
    trainable, total = trainable_parameter_summary(model)
    console.print(
        f"[bold]model[/] {cfg.model.name_or_path}: {trainable:,} of {total:,} parameters train "
        f"({100 * trainable / total:.2f}%), peft={cfg.peft.method}"
    )

    # Several processes: rank 0 evaluates and writes eval/, the others wait for it.
    before = None
    if cfg.eval.before and acc.is_main_process:
        with whole_model(acc):  # rank 0 alone generates: not in step with the other ranks
            before = evaluate_run(cfg, model, tokenizer, run_dir, "before", reuse=resume is not None)
    acc.wait_for_everyone()
    # Online methods (GRPO, ...) make their batches by sampling the policy as it trains; None: the examples.
    # What they load (distillation's teacher, a reward model) is whole on every rank, not ZeRO-3-partitioned.
    with whole_model(acc):
        batches = objective.make_batches(examples, model=model, tokenizer=tokenizer, cfg=cfg, accelerator=acc)
    # A pruned model keeps its zeros through fine-tuning (trainer.keep_sparsity), re-applied after every step.
    sparsity = SparsityMasks.from_model(model) if cfg.trainer.keep_sparsity else None
    trainer = Trainer(
        cfg=cfg.trainer,
        model=model,
        objective=objective,
        examples=examples,
        collate=objective.collate,
        run_dir=run_dir,
        accelerator=acc,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        progress=cfg.logger.progress,
        tokenizer=tokenizer,
        batches=batches,
        after_step=([sparsity.apply] if sparsity else []) + step_hooks(model),  # + AdaLoRA's rank budget
        penalties=step_penalties(model),  # AdaLoRA's orthogonality
        record=record,
    )
    # Only the rows the run will visit: 60 steps over 2000 pairs need a quarter of them.
    used = trainer.batches.sampler.upcoming(cfg.trainer.max_steps * cfg.trainer.grad_accum) if batches is None else []
    with console.status(f"preparing {len(used)} training rows (e.g. reference log-probs)"):
        note = objective.prepare(
            model,
            [examples[i] for i in used],
            device=acc.device,
            cache_dir=cache_root(cfg.model.cache_dir) / "ref_logps",
            model_id=repr((cfg.model.name_or_path, cfg.model.dtype, cfg.model.quantization, cfg.model.revision)),
        )
    if note:
        console.print(note)
    rollout_reference = getattr(trainer.batches, "reference", None)
    if (
        trainer.strategy.sharded
        and isinstance(rollout_reference, Reference)
        and method_spec(cfg.method.name).second_model(cfg)
    ):
        # An online method's frozen reference is copied lazily at its first use; a sharded model cannot be
        # copied, so the copy (whole, on every rank) is made here, before fit() shards the policy.
        rollout_reference.freeze(model)
    if cfg.logger.trackers:
        acc.init_trackers(cfg.logger.project, config=_flat(asdict(cfg)))
    with generation_cache(model, cfg.generation):  # rollouts sample with the run's KV cache
        fit = trainer.fit(resume)
    # Sharded: every rank takes part in gathering the weights; rank 0 gets the whole model (on the CPU).
    model = trainer.full_model()
    if acc.is_main_process:
        model.to(acc.device)
        heads = {name: getattr(model, name) for name in heads}  # the gathered copy's own heads
        save_model(
            model, tokenizer, run_dir / "final", merge_adapters=cfg.peft.merge_on_save, heads=heads, sparsity=sparsity
        )
        if cfg.peft.merge_on_save and _adapter_also(cfg, model):
            # The adapter alone too, for serving it over a quantized base (recipe=quantize method.adapter=keep)
            # or as a LoRA in vLLM: a few MB beside the merged model.
            save_model(model, tokenizer, run_dir / "adapter", heads=heads)
    after = None
    if cfg.eval.tasks and acc.is_main_process:
        with whole_model(acc):  # the gathered copy, on rank 0 alone
            after = evaluate_run(cfg, model, tokenizer, run_dir, "after")
    acc.wait_for_everyone()
    acc.end_training()
    if acc.num_processes > 1:
        keep_until_exit(trainer, model, batches, acc)

    summary = {
        "recipe": cfg.recipe.name,
        "model": cfg.model.name_or_path,
        "run_dir": str(run_dir),
        "status": "completed",
        "steps": fit.steps,
        "first_loss": fit.first_loss,
        "final_loss": fit.final_loss,
        "train_time_s": fit.train_time_s,
        "wall_time_s": time.perf_counter() - started,
        "tokens_per_s": fit.tokens_per_s,
        "peak_memory_mb": peak_memory_mb(acc.device),
        "trainable_params": trainable,
        "total_params": total,
        "data": asdict(stats),
        "resumed_from": fit.resumed_from,
        "distributed": trainer.strategy.record(),
        "eval": {"before": before, "after": after},
    }
    if acc.is_main_process:
        rows = {
            k: summary[k]
            for k in ("steps", "first_loss", "final_loss", "train_time_s", "tokens_per_s", "peak_memory_mb")
        }
        finish(run_dir, summary, f"{cfg.recipe.name} run summary", {**rows, **eval_rows(summary["eval"])})
    return summary


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _adapter_also(cfg: RunConfig, model) -> bool:
    """Whether adapter/ is written beside a merged final/: a weight adapter whose base is the run's own
    model (not LoftQ's, which replaced W by its 4-bit round trip; not prompt learning, which merges nothing)."""
    config = getattr(model, "active_peft_config", None)
    return config is not None and not config.is_prompt_learning and cfg.peft.init != "loftq"
