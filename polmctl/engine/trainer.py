"""The one training loop every offline objective runs in.

    polmctl run recipe=lora trainer.max_steps=200 trainer.grad_accum=4 trainer.save_every=50

Features and the flag that controls each:
  optimizer and warmup + decay schedule  trainer.optimizer, trainer.lr, trainer.scheduler, trainer.warmup_*
  gradient accumulation                   trainer.grad_accum (loss normalised over the whole step)
  gradient clipping                       trainer.max_grad_norm
  mixed precision, devices, processes     trainer.mixed_precision, trainer.device (through accelerate)
  atomic checkpoints, keep the last K     trainer.save_every, trainer.keep_last
  exact resume                            resume=auto | resume=<checkpoint dir>
  a pruned model keeps its zeros          trainer.keep_sparsity
  metrics.jsonl, trackers, progress bar   trainer.log_every, logger.trackers, logger.progress
A non-finite loss stops the run before the bad update is applied.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator

from polmctl.compress.sparsity import SparsityMasks
from polmctl.config.schema import TrainerConfig
from polmctl.engine.batches import OfflineBatches
from polmctl.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_state
from polmctl.engine.errors import TrainingError
from polmctl.engine.metrics import MetricsLog
from polmctl.engine.optim import build_optimizer, build_scheduler
from polmctl.engine.progress import StepProgress
from polmctl.objectives.base import Objective


@dataclass
class FitResult:
    steps: int
    final_loss: float
    first_loss: float
    train_time_s: float
    tokens_per_s: float
    resumed_from: str | None


class Trainer:
    def __init__(self, *, cfg: TrainerConfig, model: torch.nn.Module, objective: Objective,
                 examples: Sequence[dict] = (), collate: Callable[[list[dict]], dict] | None = None, run_dir: Path,
                 accelerator: Accelerator, seed: int, shuffle: bool = True, progress: bool = True, tokenizer=None,
                 batches=None):
        """``examples`` + ``collate`` for offline objectives, or ``batches``: any source with
        ``next_step(model)``, ``progress_epochs`` and state_dict/load_state_dict (online RL)."""
        self.cfg, self.objective = cfg, objective
        self.tokenizer = tokenizer
        self.run_dir, self.acc, self.progress = run_dir, accelerator, progress
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        # The scheduler is stepped by hand once per optimizer step, so it is not prepared.
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self.batches = batches or OfflineBatches(examples, collate, cfg.micro_batch_size, cfg.grad_accum, seed=seed,
                                                 shuffle=shuffle, rank=accelerator.process_index,
                                                 world_size=accelerator.num_processes)
        self.step = 0
        # A pruned model's zeros, kept through fine-tuning (trainer.keep_sparsity).
        self.sparsity = SparsityMasks.from_model(model) if cfg.keep_sparsity else None

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sampler": self.batches.state_dict()}

    def resume_from(self, path: Path) -> None:
        state = load_checkpoint(path, self.acc.unwrap_model(self.model))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        return save_checkpoint(self.run_dir / "checkpoints", self.step, self.acc.unwrap_model(self.model),
                               self._state(), self.cfg.keep_last, tokenizer=self.tokenizer)

    # -- one optimizer step -----------------------------------------------------------------

    def _train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        batches, source_metrics = self.batches.next_step(self.acc.unwrap_model(self.model))
        batch_time = time.perf_counter() - started  # online RL: the rollout; offline: collation
        weight = torch.tensor(float(sum(self.objective.weight(b) for b in batches)), device=self.acc.device)
        # DDP averages gradients over processes, so scale by world size to get a global mean.
        weight = self.acc.reduce(weight, reduction="sum") / self.acc.num_processes
        if weight.item() == 0:
            raise TrainingError(f"step {self.step + 1}: no trainable token in the batch; check the data's masking")
        self.model.train()
        loss_total, metric_sums, metric_counts, tokens = 0.0, {}, {}, 0
        for k, batch in enumerate(batches):
            batch = {key: v.to(self.acc.device) for key, v in batch.items()}
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            sync = contextlib.nullcontext() if k == len(batches) - 1 else self.acc.no_sync(self.model)
            with sync, self.acc.autocast():
                terms = self.objective(self.model, batch)
                loss = terms.loss_sum / weight
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {self.step + 1} (micro-batch {k}); no update was "
                        f"applied. Last good checkpoint: {self._last_checkpoint()}. Lower trainer.lr, raise "
                        "trainer.warmup_steps, or set model.dtype=float32")
                self.acc.backward(loss)
            loss_total += loss.item()
            for name, value in terms.metrics.items():  # a (sum, count) pair is a mean over its own count
                total, count = value if isinstance(value, tuple) else (value, None)
                metric_sums[name] = metric_sums.get(name, 0.0) + float(total)
                if count is not None:
                    metric_counts[name] = metric_counts.get(name, 0.0) + float(count)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm or float("inf")
        grad_norm = self.acc.clip_grad_norm_(params, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if self.sparsity is not None:
            self.sparsity.apply(self.acc.unwrap_model(self.model))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_total = self.acc.reduce(torch.tensor(loss_total, device=self.acc.device), reduction="sum").item()
        # A subset metric whose subset was empty this step (count 0) is left out, not logged as NaN.
        means = {name: total / metric_counts.get(name, weight.item())
                 for name, total in metric_sums.items() if metric_counts.get(name, 1)}
        return {"loss": loss_total, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens, **means, **source_metrics,
                "batch_time_s": batch_time, "update_time_s": time.perf_counter() - started - batch_time}

    def _last_checkpoint(self) -> str:
        found = list_checkpoints(self.run_dir / "checkpoints")
        return str(found[-1]) if found else "none (set trainer.save_every to keep some)"

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: Path | None = None) -> FitResult:
        if resume is not None:
            self.resume_from(resume)
        log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step) if self.acc.is_main_process else None
        first_loss = last_loss = math.nan
        start, total_tokens = time.perf_counter(), 0
        try:
            with StepProgress(self.cfg.max_steps, self.step, self.progress and self.acc.is_main_process) as bar:
                while self.step < self.cfg.max_steps:
                    t0 = time.perf_counter()
                    metrics = self._train_step()
                    elapsed = time.perf_counter() - t0
                    total_tokens += metrics["tokens"]
                    metrics.update(step=self.step, epoch=round(self.batches.progress_epochs, 4),
                                   step_time_s=elapsed, tokens_per_s=metrics["tokens"] / elapsed)
                    first_loss = metrics["loss"] if math.isnan(first_loss) else first_loss
                    last_loss = metrics["loss"]
                    if log and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps):
                        log.write(metrics)
                        self.acc.log({k: v for k, v in metrics.items() if k != "step"}, step=self.step)
                    bar.update(self.step, metrics)
                    if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                        self.save()
        finally:
            if log:
                log.close()
        wall = time.perf_counter() - start
        return FitResult(steps=self.step, final_loss=last_loss, first_loss=first_loss, train_time_s=wall,
                         tokens_per_s=total_tokens / wall if wall > 0 else 0.0,
                         resumed_from=str(resume) if resume else None)
