"""trainer.auto_batch: an out-of-memory step is retried with half the micro-batch, same global batch.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/engine/test_trainer_auto_batch.py
"""

from __future__ import annotations

import pytest
import torch

from polmctl.compose import compose_config
from polmctl.data import load_rows
from polmctl.engine.batches import BatchSource
from polmctl.engine.device import make_accelerator
from polmctl.engine.metrics import read_metrics
from polmctl.engine.trainer import Trainer
from polmctl.errors import TrainingError
from polmctl.methods.registry import build_objective
from polmctl.models import load_model, load_tokenizer
from polmctl.validate import validate

pytestmark = pytest.mark.recipes  # it trains (or starts processes): not in the fast tier


class OutOfMemoryAbove:
    """The SFT objective, except that a micro-batch of more than ``max_rows`` rows 'runs out of memory'."""

    def __init__(self, objective, max_rows: int):
        self.objective, self.max_rows, self.row_counts = objective, max_rows, []

    def weight(self, batch):
        return self.objective.weight(batch)

    def __call__(self, model, batch):
        self.row_counts.append(batch["input_ids"].size(0))
        if batch["input_ids"].size(0) > self.max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.objective(model, batch)


def _trainer(run_dir, *, max_rows_in_memory: int | None, auto_batch: bool, batches=None):
    cfg = validate(
        compose_config(
            [
                "recipe=sft",
                "model=tiny",
                "eval.tasks=[]",
                "data.max_rows=32",
                "data.packing=false",
                "trainer.max_steps=3",
                "trainer.micro_batch_size=4",
                "trainer.grad_accum=2",
                "trainer.warmup_ratio=0",
                f"trainer.auto_batch={str(auto_batch).lower()}",
                f"output_dir={run_dir}",
            ]
        )
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    objective = build_objective(cfg.method)
    examples, _ = objective.encode(load_rows(cfg.data.source, max_rows=cfg.data.max_rows), tokenizer, cfg.data)
    acc = make_accelerator(cfg.trainer, cfg.logger, run_dir)
    torch.manual_seed(0)
    model = load_model(cfg.model, device=acc.device, for_training=True, pad_token_id=tokenizer.pad_token_id)
    used = objective if max_rows_in_memory is None else OutOfMemoryAbove(objective, max_rows_in_memory)
    return Trainer(
        cfg=cfg.trainer,
        model=model,
        objective=used,
        examples=examples,
        collate=objective.collate,
        run_dir=run_dir,
        accelerator=acc,
        seed=cfg.seed,
        progress=False,
        batches=batches,
    ), used


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_loss(tmp_path):
    reference, _ = _trainer(tmp_path / "ref", max_rows_in_memory=None, auto_batch=False)
    reference.fit()
    retried, objective = _trainer(tmp_path / "auto", max_rows_in_memory=2, auto_batch=True)
    retried.fit()

    ref_log, auto_log = (
        read_metrics(tmp_path / "ref" / "metrics.jsonl"),
        read_metrics(tmp_path / "auto" / "metrics.jsonl"),
    )
    assert [m["loss"] for m in auto_log] == pytest.approx([m["loss"] for m in ref_log], rel=1e-5)
    assert retried.batches.micro_batch_size == 2 and [m["micro_batch_size"] for m in auto_log] == [2, 2, 2]
    # Step 1: the first 4-row micro-batch fails, then 4 micro-batches of 2; later steps start at 2 rows.
    assert objective.row_counts == [4] + [2] * 4 * 3
    for (name, a), b in zip(reference.model.named_parameters(), retried.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_out_of_memory_without_auto_batch_is_raised(tmp_path):
    trainer, _ = _trainer(tmp_path, max_rows_in_memory=2, auto_batch=False)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit()


def test_auto_batch_stops_with_a_clear_error_below_one_row(tmp_path):
    trainer, _ = _trainer(tmp_path, max_rows_in_memory=0, auto_batch=True)
    with pytest.raises(TrainingError, match="auto_batch cannot go lower"):
        trainer.fit()


def test_auto_batch_refuses_a_batch_source_that_cannot_re_split(tmp_path):
    class Rollouts(BatchSource):  # an online source: its micro-batches are made during the rollout
        pass

    with pytest.raises(TrainingError, match="trainer.auto_batch: this method's batches \\(Rollouts\\)"):
        _trainer(tmp_path, max_rows_in_memory=None, auto_batch=True, batches=Rollouts())
