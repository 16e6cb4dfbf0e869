"""Run a recipe in-process on model=tiny and keep hold of the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import polmctl.runners.train as train_runner
from polmctl.compose import compose_config
from polmctl.engine.metrics import read_metrics
from polmctl.validate import validate

FAST = ["model=tiny", "eval=none", "eval.tasks=[]", "logger.progress=false", "trainer.warmup_ratio=0"]


class Run:
    def __init__(self, run_dir: Path, summary: dict, model: torch.nn.Module, initial: dict[str, torch.Tensor]):
        self.dir, self.summary, self.model, self.initial = run_dir, summary, model, initial

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in read_metrics(self.dir / "metrics.jsonl")]

    def unchanged_parameters(self) -> list[str]:
        current = dict(self.model.named_parameters())
        return [n for n, before in self.initial.items() if torch.equal(before, current[n].detach().cpu())]


@pytest.fixture()
def train_recipe(tmp_path, monkeypatch):
    """train_recipe("lora", "trainer.max_steps=3") -> Run."""

    apply_peft = train_runner.apply_peft

    def run(recipe: str, *overrides: str, run_dir: Path | None = None) -> Run:
        captured = {}

        def capturing_apply_peft(*args, **kwargs):
            model = apply_peft(*args, **kwargs)
            captured["model"] = model
            captured["initial"] = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            return model

        monkeypatch.setattr(train_runner, "apply_peft", capturing_apply_peft)
        out = run_dir or tmp_path / recipe
        cfg = validate(compose_config([f"recipe={recipe}", *FAST, *overrides, f"output_dir={out}"]))
        summary = train_runner.run_train(cfg)
        assert json.loads((out / "summary.json").read_text())["status"] == "completed"
        return Run(out, summary, captured["model"], captured["initial"])

    return run
