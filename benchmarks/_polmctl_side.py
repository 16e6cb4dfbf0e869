"""The polmctl side of benchmarks/vs_trl.py: a workload's recipe, assembled as the train runner
assembles it (polmctl/runners/train.py), stepped one optimizer step at a time.

    .venv/bin/python benchmarks/vs_trl.py --methods sft      # (this module is a helper of it)

No evaluation and no saving: only what ``polmctl run`` does per step (``Trainer._train_step``,
metrics line included) is timed. DPO's one-time reference scoring (``objective.prepare``) runs
at build time into an empty cache dir and is reported as ``setup_s``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from _workload import DATA, RECIPES, Workload
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from polmctl.compose import compose_config
from polmctl.data import load_rows
from polmctl.engine.device import make_accelerator
from polmctl.engine.metrics import MetricsLog
from polmctl.engine.trainer import Trainer
from polmctl.methods.registry import build_objective
from polmctl.models import apply_peft, load_model, load_tokenizer
from polmctl.validate import validate


def polmctl_overrides(w: Workload, run_dir: Path) -> list[str]:
    model = "model=tiny" if w.model == "tiny" else f"model.name_or_path={w.model_name}"
    overrides = [
        f"recipe={RECIPES[w.method]}",
        model,
        f"model.dtype={w.dtype}",
        "eval=none",
        "eval.tasks=[]",
        "logger.progress=false",
        "trainer.device=cpu",
        "trainer.warmup_ratio=0",
        "trainer.scheduler=constant",
        f"trainer.lr={w.lr}",
        f"trainer.max_steps={w.steps}",
        f"trainer.micro_batch_size={w.micro_batch_size}",
        f"trainer.grad_accum={w.grad_accum}",
        f"data.source={DATA[w.method]}",
        f"data.max_rows={w.rows_needed}",
        "data.shuffle=false",
        f"data.max_length={w.max_length}",
        "peft.dropout=0",
        f"peft.r={w.lora_r}",
        f"peft.alpha={w.lora_alpha}",
        f"seed={w.seed}",
        f"output_dir={run_dir}",
    ]
    if w.method == "dpo":  # DPO alone, as TRL's side (recipe=dpo adds RPO's NLL term: method.sft_weight=1)
        overrides += [f"method.beta={w.beta}", "method.sft_weight=0"]
    if w.method == "grpo":
        overrides += [
            f"method.num_generations={w.num_generations}",
            f"method.max_new_tokens={w.max_new_tokens}",
            f"method.temperature={w.temperature}",
            "method.beta=0.0",
        ]
    return overrides


class PolmctlSide:
    name = "polmctl"

    def __init__(self, w: Workload, run_dir: Path | None = None):
        self.workload = w
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix=f"bench-polmctl-{w.method}-"))
        cfg = validate(compose_config(polmctl_overrides(w, self.run_dir)))
        self.cfg = cfg
        set_seed(cfg.seed)
        # accelerate keeps one process-wide state and refuses a second Accelerator with another
        # mixed_precision: after a TRL side with bf16=True (the equivalence check builds one
        # first) polmctl's own (mixed_precision=no, bf16 weights) would stop with "AcceleratorState
        # has already been initialized". Reset it as transformers' TrainingArguments does before
        # each of its trainers; a TRL side built after this one resets it back (TRLSide checks).
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = make_accelerator(cfg.trainer, cfg.logger, self.run_dir)
        self.tokenizer = load_tokenizer(cfg.model)
        self.rows = load_rows(cfg.data.source, cfg.data.split, max_rows=cfg.data.max_rows)
        self.objective = build_objective(cfg.method)
        examples, _ = self.objective.encode(self.rows, self.tokenizer, cfg.data)
        self.examples = examples
        model = load_model(cfg.model, device=acc.device, for_training=True, pad_token_id=self.tokenizer.pad_token_id)
        self.model = apply_peft(model, cfg.peft, self.tokenizer)
        batches = self.objective.make_batches(
            examples, model=self.model, tokenizer=self.tokenizer, cfg=cfg, accelerator=acc
        )
        self.trainer = Trainer(
            cfg=cfg.trainer,
            model=self.model,
            objective=self.objective,
            examples=examples,
            collate=self.objective.collate,
            run_dir=self.run_dir,
            accelerator=acc,
            seed=cfg.seed,
            shuffle=False,
            progress=False,
            tokenizer=self.tokenizer,
            batches=batches,
        )
        started = time.perf_counter()
        used = (
            self.trainer.batches.sampler.upcoming(cfg.trainer.max_steps * cfg.trainer.grad_accum) if not batches else []
        )
        self.objective.prepare(
            self.model,
            [examples[i] for i in used],
            device=acc.device,
            cache_dir=self.run_dir / "ref_logps",
            model_id=repr(cfg.model.name_or_path),
        )
        self.setup_s = time.perf_counter() - started
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=0)

    def step(self) -> dict[str, float]:
        """One optimizer step: its wall time, the tokens it processed (non-padding, forward and
        backward; GRPO: prompt + completion of every sample) and, for GRPO, the rollout's part."""
        started = time.perf_counter()
        metrics = self.trainer._train_step()
        self.log.write({**metrics, "step": self.trainer.step})  # what polmctl run writes every step
        out = {"time_s": time.perf_counter() - started, "tokens": float(metrics["tokens"]), "loss": metrics["loss"]}
        if "rollout_time_s" in metrics:
            out.update(
                rollout_s=metrics["rollout_time_s"],
                new_tokens=metrics["completion_length"] * self.workload.micro_batch_size * self.workload.grad_accum,
            )
        return out

    def close(self) -> None:
        self.log.close()


def first_batch(side: PolmctlSide) -> dict[str, torch.Tensor]:
    """The first micro-batch polmctl trains on (offline methods), without moving the data position."""
    state = side.trainer.batches.state_dict()
    batches, _ = side.trainer.batches.next_step(side.model)
    side.trainer.batches.load_state_dict(state)
    return batches[0]
