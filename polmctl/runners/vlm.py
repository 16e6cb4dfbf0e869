"""The vlm runner: a LLaVA-style vision-language model from a causal LM, trained in two stages.

    polmctl run recipe=vlm_adapter                                    # SmolLM2 + random SigLIP, builtin:shapes
    polmctl run recipe=vlm_adapter model=tiny trainer.max_steps=20
    polmctl eval outputs/vlm_adapter/<date>/<time>                     # re-evaluate a finished run

data -> model (LM + vision tower + projector, ``polmctl.multimodal.model``) -> evaluate ->
stage 1 (the projector trains; LM and encoder frozen) -> stage 2 (the projector and LoRA
adapters on the LM) -> save -> evaluate. Each stage is one ``polmctl.engine.trainer.Trainer``
run over the same examples. With ``method.train=false`` it only evaluates model.name_or_path.

Writes into the run dir: stage1/ and stage2/ (metrics.jsonl, checkpoints/ with
trainer.save_every), final/ (``LlavaForConditionalGeneration`` with the LoRA update merged,
plus its ``LlavaProcessor``: ``from_pretrained`` loads both), eval/vqa-{before,after}.jsonl
(every answer) and eval/results-*.json, summary.json (per-stage losses, accuracy before and
after, and the chance level of the held-out questions).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from polmctl.config.schema import RunConfig
from polmctl.console import console
from polmctl.data import load_config_rows, load_rows
from polmctl.engine.device import make_accelerator
from polmctl.engine.metrics import peak_memory_mb, write_json
from polmctl.engine.trainer import Trainer
from polmctl.errors import ConfigError
from polmctl.methods.vlm import VlmObjective
from polmctl.models import resolve_model_path, save_model, trainable_parameter_summary
from polmctl.multimodal.evaluate import answer_accuracy
from polmctl.multimodal.model import add_lm_adapters, build_vlm, is_vlm_dir, load_vlm, set_stage
from polmctl.runners.common import begin, eval_rows, finish

TASK = "vqa"  # the name of the answer-accuracy results in summary.json and eval/


def run_vlm(cfg: RunConfig) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = begin(cfg, "vlm", full_precision="the vlm recipe trains a full-precision LM; use model.quantization=none")
    _check_config(cfg)
    m = cfg.method
    acc = make_accelerator(cfg.trainer, cfg.logger, run_dir)

    # Data first: a bad file, column or picture fails here, before any model weights load.
    rows = load_config_rows(cfg.data) if m.train else None
    held_out = _eval_rows(cfg)

    saved = is_vlm_dir(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))
    if not m.train and not saved:
        raise ConfigError(
            "model.name_or_path",
            f"method.train=false evaluates a saved vision-language model, but "
            f"{cfg.model.name_or_path} holds none; give a vlm_adapter run dir",
        )
    with console.status(f"{'loading' if saved else 'building'} the vision-language model"):
        if saved:
            model, processor = load_vlm(cfg.model, device=acc.device, for_training=m.train)
        else:
            model, processor = build_vlm(cfg.model, m, device=acc.device)
    image_tokens = model.config.image_seq_length
    vision = "(a saved vision-language model)" if saved else f"+ {m.vision_model or 'a random SigLIP encoder'}"
    console.print(f"[bold]model[/] {cfg.model.name_or_path} {vision}: {image_tokens} image tokens per picture")
    if not m.train:
        return _evaluate_only(cfg, model, processor, held_out, run_dir, started)

    objective = VlmObjective(processor, image_tokens)
    examples, stats = objective.encode(rows, processor.tokenizer, cfg.data)
    console.print(f"[bold]data[/] {cfg.data.source}: {stats.summary()}")
    before = _evaluate(cfg, model, processor, held_out, run_dir, "before") if cfg.eval.before else None

    stage1 = round(cfg.trainer.max_steps * m.stage1_fraction)
    plan = [(1, stage1, m.stage1_lr or cfg.trainer.lr), (2, cfg.trainer.max_steps - stage1, cfg.trainer.lr)]
    stages = []
    for stage, steps, lr in plan:
        if steps == 0:
            continue
        if stage == 2:
            model = add_lm_adapters(model, cfg.peft)
        set_stage(model, stage, train_vision=m.train_vision)
        trainable, total = trainable_parameter_summary(model)
        console.print(
            f"[bold]stage {stage}[/] {steps} steps at lr {lr:g}: {trainable:,} of {total:,} parameters "
            f"train ({'projector' + (' + encoder' if m.train_vision else '')}"
            f"{' + ' + cfg.peft.method + ' on the LM' if stage == 2 else ''})"
        )
        (run_dir / f"stage{stage}").mkdir(exist_ok=True)
        trainer = Trainer(
            cfg=replace(cfg.trainer, max_steps=steps, lr=lr),
            model=model,
            objective=objective,
            examples=examples,
            collate=objective.collate,
            run_dir=run_dir / f"stage{stage}",
            accelerator=acc,
            seed=cfg.seed + stage - 1,
            shuffle=cfg.data.shuffle,
            progress=cfg.logger.progress,
            tokenizer=processor.tokenizer,
        )
        fit = trainer.fit()
        model = acc.unwrap_model(trainer.model)
        stages.append(
            {
                "stage": stage,
                "steps": fit.steps,
                "lr": lr,
                "first_loss": fit.first_loss,
                "final_loss": fit.final_loss,
                "train_time_s": fit.train_time_s,
                "tokens_per_s": fit.tokens_per_s,
                "trainable_params": trainable,
                "total_params": total,
            }
        )
    if acc.is_main_process:
        save_model(model, processor, run_dir / "final", merge_adapters=hasattr(model, "peft_config"))
    after = _evaluate(cfg, model, processor, held_out, run_dir, "after")
    acc.end_training()

    summary = {
        "recipe": cfg.recipe.name,
        "model": cfg.model.name_or_path,
        "vision_model": m.vision_model or "random siglip",
        "run_dir": str(run_dir),
        "status": "completed",
        "image_tokens": image_tokens,
        "stages": stages,
        "steps": sum(s["steps"] for s in stages),
        "first_loss": stages[0]["first_loss"],
        "final_loss": stages[-1]["final_loss"],
        "train_time_s": sum(s["train_time_s"] for s in stages),
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_mb": peak_memory_mb(acc.device),
        "data": asdict(stats),
        "eval": {"before": before, "after": after},
    }
    if acc.is_main_process:
        finish(run_dir, summary, f"{cfg.recipe.name} run summary", _table_rows(summary))
    return summary


def _check_config(cfg: RunConfig) -> None:
    """What the method schema cannot see: the rest of the run must fit the vlm runner."""
    m = cfg.method
    if cfg.resume is not None:
        raise ConfigError("resume", "vlm runs do not resume yet; start a new run (resume=null)")
    if cfg.eval.tasks:
        raise ConfigError(
            "eval.tasks",
            f"got {list(cfg.eval.tasks)}; the vlm runner scores answers to held-out "
            "picture questions itself (eval.max_samples rows of eval.source, after "
            "training and with eval.before=true before), so text tasks do not apply: "
            "use eval.tasks=[]",
        )
    stage2 = cfg.trainer.max_steps - round(cfg.trainer.max_steps * m.stage1_fraction)
    if m.train and stage2 > 0 and cfg.peft.method not in ("lora", "dora"):
        raise ConfigError(
            "peft.method",
            f"stage 2 tunes the LM with lora or dora adapters, got {cfg.peft.method!r}; "
            "use peft=lora, or method.stage1_fraction=1.0 to train the projector only",
        )


def _eval_rows(cfg: RunConfig) -> list[dict]:
    """Held-out picture questions: eval.source (its test split), else data.source's data.eval_split."""
    source = cfg.eval.source or cfg.data.source
    same = source == cfg.data.source
    return load_rows(
        source,
        cfg.data.eval_split if same else "test",
        max_rows=cfg.eval.max_samples,
        options=(dict(cfg.data.options) or None) if same else None,
    )


def _evaluate(cfg: RunConfig, model, processor, rows: list[dict], run_dir: Path, tag: str) -> dict:
    with console.status(f"evaluating ({tag or 'saved model'}): answers to {len(rows)} held-out picture questions"):
        result = answer_accuracy(
            model, processor, rows, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens
        )
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    (out / f"{TASK}{suffix}.jsonl").write_text("".join(_json_line(s) for s in result["samples"]))
    results = {TASK: result["metrics"]}
    write_json(out / f"results{suffix}.json", results)
    return results


def _evaluate_only(cfg: RunConfig, model, processor, rows: list[dict], run_dir: Path, started: float) -> dict:
    results = _evaluate(cfg, model, processor, rows, run_dir, "")
    summary = {
        "model": cfg.model.name_or_path,
        "run_dir": str(run_dir),
        "status": "completed",
        "wall_time_s": time.perf_counter() - started,
        "eval": results,
    }
    return finish(
        run_dir, summary, f"eval: {cfg.model.name_or_path}", {f"{TASK}/{k}": v for k, v in results[TASK].items()}
    )


def _json_line(sample: dict) -> str:
    return json.dumps(sample) + "\n"


def _table_rows(summary: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for s in summary["stages"]:
        rows[f"stage {s['stage']} steps"] = s["steps"]
        rows[f"stage {s['stage']} loss first -> final"] = f"{s['first_loss']:.4g} -> {s['final_loss']:.4g}"
    for key in ("train_time_s", "peak_memory_mb"):
        rows[key] = summary[key]
    rows.update(eval_rows(summary["eval"]))
    return rows
