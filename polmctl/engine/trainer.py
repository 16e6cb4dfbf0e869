"""The one training loop every offline objective runs in.

    polmctl run recipe=lora trainer.max_steps=200 trainer.grad_accum=4 trainer.save_every=50

Features and the flag that controls each:
  optimizer and warmup + decay schedule  trainer.optimizer, trainer.lr, trainer.scheduler, trainer.warmup_*
  gradient accumulation                   trainer.grad_accum (loss normalised over the whole step)
  gradient clipping                       trainer.max_grad_norm
  mixed precision, devices, processes     trainer.mixed_precision, trainer.device, launcher (accelerate)
  halve the micro-batch on out-of-memory  trainer.auto_batch (same global batch: grad accumulation doubles)
  atomic checkpoints, keep the last K     trainer.save_every, trainer.keep_last (a killed save's temp dir
                                          is removed when the next run starts)
  exact resume                            resume=auto | resume=<checkpoint dir>
  a pruned model keeps its zeros          trainer.keep_sparsity (the runner's after_step hook)
  penalties of the trainable weights      peft.adalora_orth_reg_weight (the runner's penalties: AdaLoRA's
                                          orthogonality, added to the gradient, logged as loss/<name>)
  metrics.jsonl, trackers, progress bar   trainer.log_every, logger.trackers, logger.progress
A non-finite loss stops the run before the bad update is applied.

With several processes (launcher=accelerate, docs/distributed.md) each rank trains on its own
slice of every step; the logged loss, metrics and token counts are over all ranks, and only
rank 0 writes metrics.jsonl and checkpoints (the others wait for it). The strategy the launcher
asked for (DDP, FSDP2, DeepSpeed ZeRO-2/3) is the one that runs, or the run stops
(engine/sharding.py); a sharded model (FSDP2, ZeRO-3) is prepared when ``fit`` starts, so the
runner's work before it (references, cached log-probs) sees the whole model, and its
checkpoints are sharded (FSDP2: every rank writes its shard).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from torch.nn.parallel import DistributedDataParallel

from polmctl.config.schema import TrainerConfig
from polmctl.console import console
from polmctl.engine.batches import BatchSource, OfflineBatches
from polmctl.engine.checkpoint import (
    is_sharded_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    remove_interrupted_saves,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from polmctl.engine.contract import Objective
from polmctl.engine.device import run_strategy
from polmctl.engine.metrics import MetricsLog
from polmctl.engine.optim import build_optimizer, build_scheduler
from polmctl.engine.progress import StepProgress
from polmctl.engine.sharding import (
    FSDPMicroBatch,
    Strategy,
    check_fsdp_on_cpu,
    check_plugin_dtypes,
    fill_skeleton,
    fsdp_plugin,
    gather_full_model,
    initialise_root,
    layer_classes,
    meta_skeleton,
    shard_fsdp2,
)
from polmctl.errors import TrainingError

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    steps: int
    final_loss: float
    first_loss: float
    train_time_s: float
    tokens_per_s: float
    resumed_from: str | None


class ModelAttributesDDP(DistributedDataParallel):
    """DDP that also answers the wrapped model's attributes. Objectives read ``model.config``,
    call ``model.disable_adapter()`` (peft) and so on, yet their forward passes must go through
    the DDP wrapper for gradients to be averaged; torch's DDP hides the attributes."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


class Penalty(Protocol):
    """A term of the trainable parameters alone, added to every step's loss (its gradient, and logged)."""

    name: str

    def __call__(self, model: torch.nn.Module) -> torch.Tensor: ...


def check_strategy_fits(
    strategy: Strategy, cfg: TrainerConfig, after_step: Sequence[Callable], penalties: Sequence[Penalty] = ()
) -> None:
    """What this loop does not combine with the strategy, said before anything is sharded."""
    if (strategy.sharded or strategy.deepspeed) and penalties:
        raise TrainingError(
            f"{strategy.requested} keeps the gradients where this loop cannot add {penalties[0].name} to them "
            "(a penalty of the trainable weights: peft.method=adalora); use launcher.config_file=ddp or one process"
        )
    if strategy.deepspeed:
        if cfg.grad_accum > 1:
            # accelerate's DeepSpeed wrapper steps the engine after every backward outside accelerator.accumulate.
            raise TrainingError(
                "trainer.grad_accum: DeepSpeed steps the optimizer after every backward pass here; "
                "set trainer.grad_accum=1 and raise trainer.micro_batch_size instead"
            )
        if cfg.save_every:
            raise TrainingError(
                "trainer.save_every: DeepSpeed's own checkpoints are pickles (polmctl never unpickles a "
                "checkpoint) and checkpoints/ would keep rank 0's optimizer shard only; set "
                "trainer.save_every=0 (final/ is still written, gathered on rank 0)"
            )
    if strategy.sharded and after_step:
        raise TrainingError(
            f"{strategy.requested} shards the weights, and this run changes them after every optimizer step "
            "(trainer.keep_sparsity or peft.method=adalora), which polmctl does on whole weights only; "
            "drop that option or use launcher.config_file=ddp"
        )
    if strategy.sharded and cfg.optimizer == "adamw_8bit":
        raise TrainingError(
            f"trainer.optimizer: adamw_8bit (bitsandbytes) is not run on sharded weights ({strategy.requested}) "
            "by polmctl; use trainer.optimizer=adamw"
        )


class Trainer:
    def __init__(
        self,
        *,
        cfg: TrainerConfig,
        model: torch.nn.Module,
        objective: Objective,
        examples: Sequence[dict] = (),
        collate: Callable[[list[dict]], dict] | None = None,
        run_dir: Path,
        accelerator: Accelerator,
        seed: int,
        shuffle: bool = True,
        progress: bool = True,
        tokenizer=None,
        batches: BatchSource | None = None,
        after_step: Sequence[Callable[[torch.nn.Module], None]] = (),
        penalties: Sequence[Penalty] = (),
        record: dict[str, str] | None = None,
    ):
        """``examples`` + ``collate`` for offline methods, or ``batches``: the method's own
        BatchSource (online RL). ``after_step``: functions of the unwrapped model called after
        every optimizer step (a pruned model's zeros, re-applied). ``penalties``: terms of the
        trainable parameters alone (AdaLoRA's orthogonality), added once a step to the gradient and
        logged as loss/<name>. ``record``: text files every
        checkpoint keeps (relative path -> text: what the run was, to check a resume against)."""
        self.cfg, self.objective = cfg, objective
        self.tokenizer = tokenizer
        self.run_dir, self.acc, self.progress = run_dir, accelerator, progress
        self.strategy = run_strategy(accelerator)
        check_strategy_fits(self.strategy, cfg, after_step, penalties)
        self.model = model
        self.skeleton: torch.nn.Module | None = None  # a sharded model's layout on the meta device
        self.micro: FSDPMicroBatch | None = None
        self.prepared = False
        if not self.strategy.sharded:  # a sharded model is prepared when fit() starts
            self.prepare()
        self.batches = batches or OfflineBatches(
            examples,
            collate,
            cfg.micro_batch_size,
            cfg.grad_accum,
            seed=seed,
            shuffle=shuffle,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        if cfg.auto_batch and accelerator.num_processes > 1:
            # One rank retrying a step while the others wait in the gradient all-reduce would hang.
            raise TrainingError(
                "trainer.auto_batch works in one process only; with several processes lower "
                "trainer.micro_batch_size (and raise trainer.grad_accum) instead"
            )
        if cfg.auto_batch and not self.batches.can_halve:
            raise TrainingError(
                f"trainer.auto_batch: this method's batches ({type(self.batches).__name__}) cannot be "
                "re-split after an out-of-memory error; set trainer.auto_batch=false and lower "
                "trainer.micro_batch_size instead"
            )
        self.step = 0
        self.after_step = list(after_step)
        self.penalties = list(penalties)
        self.record = dict(record or {})

    # -- the model under its strategy ---------------------------------------------------------
    def prepare(self) -> None:
        """Optimizer, schedule and the model under the run's strategy; stops if the strategy that
        came out is not the one requested (docs/distributed.md)."""
        if self.prepared:
            return
        model, cfg, acc, strategy = self.model, self.cfg, self.acc, self.strategy
        if strategy.sharded:
            self.skeleton = meta_skeleton(model)
        if strategy.requested == "fsdp2" and acc.distributed_type != DistributedType.FSDP:
            # accelerate applies FSDP on GPUs only (engine/sharding.py): torch's fully_shard, here.
            plugin = fsdp_plugin()
            check_fsdp_on_cpu(plugin, model, acc.mixed_precision)
            strategy.details["wrapped"] = shard_fsdp2(model, plugin, acc.mixed_precision)
            strategy.applied_by = "polmctl (torch fully_shard; accelerate applies FSDP on GPUs only)"
            self.optimizer = build_optimizer(model, cfg)  # after fully_shard: over the sharded parameters
            self.scheduler = build_scheduler(self.optimizer, cfg)
        else:
            if strategy.requested == "fsdp2":
                check_plugin_dtypes(model, acc.mixed_precision)
            if strategy.deepspeed:
                # No dataloader goes through prepare() (batches are polmctl's), so DeepSpeed learns it here.
                acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
            self.optimizer = build_optimizer(model, cfg)
            self.scheduler = build_scheduler(self.optimizer, cfg)
            # The scheduler is stepped by hand once per optimizer step, so it is not prepared.
            self.model, self.optimizer = acc.prepare(model, self.optimizer)
            strategy.applied_by = "accelerate" if strategy.requested != "single" else None
            if strategy.requested == "fsdp2":
                plugin = acc.state.fsdp_plugin
                strategy.details["wrapped"] = sorted(plugin.transformer_cls_names_to_wrap or layer_classes(model))
        strategy.confirm(self.model)
        if isinstance(self.model, DistributedDataParallel):
            self.model.__class__ = ModelAttributesDDP
        if strategy.requested == "fsdp2":
            initialise_root(self.model, acc.device)
            self.micro = FSDPMicroBatch(self.model)
        self.prepared = True

    def full_model(self) -> torch.nn.Module | None:
        """The trained model with whole weights, for final/ and evaluation: on rank 0 of a sharded
        run the weights are gathered into a copy of the model on the CPU (None on the other ranks;
        every rank must call it). Otherwise the model itself."""
        if not self.strategy.sharded:
            return self.acc.unwrap_model(self.model)
        if self.strategy.requested == "fsdp2":
            return gather_full_model(self.model, self.skeleton, self.acc.is_main_process)
        full = self.acc.get_state_dict(self.model)  # ZeRO-3: gathered on rank 0 (zero3_save_16bit_model)
        return fill_skeleton(self.skeleton, full) if self.acc.is_main_process else None

    def _optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under accelerate's wrapper, for torch's sharded state dict."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    # -- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = {"scheduler": self.scheduler.state_dict(), "sampler": self.batches.state_dict()}
        if self.strategy.requested != "fsdp2":  # FSDP2: sharded, in the checkpoint's sharded/
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def resume_from(self, path: Path) -> None:
        sharded_run = self.strategy.requested == "fsdp2"
        if is_sharded_checkpoint(path) != sharded_run:
            written = "a sharded run (FSDP2)" if is_sharded_checkpoint(path) else "an unsharded run"
            raise TrainingError(
                f"resume: {path} was written by {written}; resume it with the strategy that wrote it "
                f"(launcher.config_file{'=fsdp' if is_sharded_checkpoint(path) else ': not fsdp'}), or export it "
                f"with polmctl export {path}"
            )
        if sharded_run:
            state = load_sharded_checkpoint(path, self.model, self._optimizer())
        else:
            state = load_checkpoint(path, self.acc.unwrap_model(self.model))
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["sampler"])
        per_rank = state.get("rng_per_rank") or []
        # Each rank continues its own dropout / sampling stream when the process count is unchanged.
        set_rng_state(per_rank[self.acc.process_index] if len(per_rank) == self.acc.num_processes else state["rng"])
        self.step = state["step"]

    def save(self) -> Path | None:
        """Rank 0 writes checkpoints/step-N (with every rank's RNG state); the others wait for it."""
        state = self._state()
        if self.acc.num_processes > 1:
            state["rng_per_rank"] = gather_object([rng_state()])
        path = None
        if self.strategy.requested == "fsdp2":  # every rank writes its shard
            path = save_sharded_checkpoint(
                self.run_dir / "checkpoints",
                self.step,
                self.model,
                self._optimizer(),
                state,
                self.cfg.keep_last,
                tmp_pid=broadcast_object_list([os.getpid()])[0],
                is_main=self.acc.is_main_process,
                barrier=self.acc.wait_for_everyone,
                tokenizer=self.tokenizer,
                files=self.record,
            )
        elif self.acc.is_main_process:
            path = save_checkpoint(
                self.run_dir / "checkpoints",
                self.step,
                self.acc.unwrap_model(self.model),
                state,
                self.cfg.keep_last,
                tokenizer=self.tokenizer,
                files=self.record,
            )
        self.acc.wait_for_everyone()
        return path

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
        while True:
            try:
                loss_total, metric_sums, metric_counts, tokens = self._accumulate(batches, weight)
                break
            except torch.OutOfMemoryError:
                if not self.cfg.auto_batch:
                    raise
            # Retried outside the except block, so the failed attempt's activations are freed first.
            batches = self._halve_micro_batch(len(batches))
        params = [p for p in self.model.parameters() if p.requires_grad]
        penalty_metrics = self._add_penalties(params)
        max_norm = self.cfg.max_grad_norm or float("inf")
        grad_norm = self.acc.clip_grad_norm_(params, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        for hook in self.after_step:
            hook(self.acc.unwrap_model(self.model))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_total, metric_sums, metric_counts, tokens, source_metrics = self._over_ranks(
            loss_total, metric_sums, metric_counts, tokens, source_metrics
        )
        total_weight = weight.item() * self.acc.num_processes
        # A subset metric whose subset was empty this step (count 0) is left out, not logged as NaN.
        means = {
            name: total / metric_counts.get(name, total_weight)
            for name, total in metric_sums.items()
            if metric_counts.get(name, 1)
        }
        if self.cfg.auto_batch:
            means["micro_batch_size"] = self.batches.micro_batch_size
        grad_norm = math.nan if grad_norm is None else float(grad_norm)  # DeepSpeed may not report one
        return {
            "loss": loss_total,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            **means,
            **penalty_metrics,
            **source_metrics,
            "batch_time_s": batch_time,
            "update_time_s": time.perf_counter() - started - batch_time,
        }

    def _add_penalties(self, params: list[torch.nn.Parameter]) -> dict[str, float]:
        """Each penalty's gradient, added to the accumulated one of ``params`` (the trainable ones; DDP
        wraps the same tensors). A penalty of the parameters alone is the same for every micro-batch,
        so adding it once a step equals adding it to each micro-batch's mean loss. torch.autograd.grad,
        not backward: it leaves DDP's gradient hooks alone (every rank holds the same parameters, so
        every rank adds the same gradient)."""
        if not self.penalties:
            return {}
        model = self.acc.unwrap_model(self.model)
        logged = {}
        for penalty in self.penalties:
            value = penalty(model)
            grads = torch.autograd.grad(value, params, allow_unused=True)
            for param, grad in zip(params, grads):
                if grad is not None:
                    param.grad = grad.to(param.dtype) if param.grad is None else param.grad.add_(grad)
            logged[f"loss/{penalty.name}"] = value.item()
        return logged

    def _accumulate(self, batches: list[dict], weight: torch.Tensor) -> tuple[float, dict, dict, int]:
        """Forward and backward every micro-batch of the step; gradients sync on the last one."""
        loss_total, metric_sums, metric_counts, tokens = 0.0, {}, {}, 0
        for k, batch in enumerate(batches):
            batch = {key: v.to(self.acc.device) for key, v in batch.items()}
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            last = k == len(batches) - 1
            # FSDP2 reduce-scatters every micro-batch's gradients into their shards (no unsharded copy kept).
            sync = contextlib.nullcontext() if last or self.strategy.sharded else self.acc.no_sync(self.model)
            micro = self.micro or _NoMicroBatch
            with sync, self.acc.autocast():
                with micro.forward():
                    terms = self.objective(self.model, batch)
                loss = terms.loss_sum / weight
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {self.step + 1} (micro-batch {k}); no update was "
                        f"applied. Last good checkpoint: {self._last_checkpoint()}. Lower trainer.lr, raise "
                        "trainer.warmup_steps, or set model.dtype=float32"
                    )
                with micro.backward():
                    self.acc.backward(loss)
            loss_total += loss.item()
            for name, value in terms.metrics.items():  # a (sum, count) pair is a mean over its own count
                total, count = value if isinstance(value, tuple) else (value, None)
                metric_sums[name] = metric_sums.get(name, 0.0) + float(total)
                if count is not None:
                    metric_counts[name] = metric_counts.get(name, 0.0) + float(count)
        return loss_total, metric_sums, metric_counts, tokens

    def _halve_micro_batch(self, n_batches: int) -> list[dict]:
        """trainer.auto_batch: drop the failed attempt's gradients, re-split the same rows."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        before = self.batches.micro_batch_size
        try:
            batches = self.batches.halve_micro_batch()
        except ValueError as err:
            raise TrainingError(
                f"out of memory at step {self.step + 1} and trainer.auto_batch cannot go lower: {err}; "
                "lower data.max_length, use peft or model.gradient_checkpointing=true"
            ) from None
        console.print(
            f"[yellow]auto_batch:[/] out of memory at step {self.step + 1}; micro-batch {before} -> "
            f"{self.batches.micro_batch_size} rows, {n_batches} -> {len(batches)} micro-batches per step "
            "(same global batch)",
            highlight=False,
        )
        return batches

    def _over_ranks(self, loss: float, sums: dict, counts: dict, tokens: int, source: dict):
        """The step's numbers over all processes: sums, counts and tokens are summed; the loss and a
        batch source's metrics are averaged (each rank's loss is scaled by the world size, because
        DDP averages gradients, so the mean of the ranks' losses is the global per-token mean)."""
        if self.acc.num_processes == 1:
            return loss, sums, counts, tokens, source
        # Objects, not tensors: ranks may hold different metric names (a subset absent on one rank).
        parts = gather_object([(loss, sums, counts, tokens, source)])
        merged_sums, merged_counts, merged_source = {}, {}, {}
        for _, s, c, _, src in parts:
            for name, v in s.items():
                merged_sums[name] = merged_sums.get(name, 0.0) + v
            for name, v in c.items():
                merged_counts[name] = merged_counts.get(name, 0.0) + v
            for name, v in src.items():
                merged_source.setdefault(name, []).append(float(v))
        return (
            sum(p[0] for p in parts) / len(parts),
            merged_sums,
            merged_counts,
            sum(p[3] for p in parts),
            {name: sum(v) / len(v) for name, v in merged_source.items()},
        )

    def _last_checkpoint(self) -> str:
        found = list_checkpoints(self.run_dir / "checkpoints")
        return str(found[-1]) if found else "none (set trainer.save_every to keep some)"

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: Path | None = None) -> FitResult:
        self.prepare()
        if self.acc.is_main_process:
            logger.info(self.strategy.line())  # Hydra's job logging: the terminal and the run's polmctl.log
            for note in remove_interrupted_saves(self.run_dir / "checkpoints"):  # saves a killed run left half-written
                console.print(note, markup=False, highlight=False, soft_wrap=True)
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
                    metrics.update(
                        step=self.step,
                        epoch=round(self.batches.progress_epochs, 4),
                        step_time_s=elapsed,
                        tokens_per_s=metrics["tokens"] / elapsed,
                    )
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
        return FitResult(
            steps=self.step,
            final_loss=last_loss,
            first_loss=first_loss,
            train_time_s=wall,
            tokens_per_s=total_tokens / wall if wall > 0 else 0.0,
            resumed_from=str(resume) if resume else None,
        )


class _NoMicroBatch:
    """FSDPMicroBatch's contexts where there is no FSDP model: nothing to do."""

    forward = backward = staticmethod(contextlib.nullcontext)
