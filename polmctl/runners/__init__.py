"""Runners by name; a method's row in polmctl/methods/registry.py names its runner. A runner loads,
applies, writes; nothing more."""

from __future__ import annotations

from typing import Any, Callable

from polmctl.config.schema import RunConfig
from polmctl.runners.edit import run_edit
from polmctl.runners.evaluate import run_evaluate
from polmctl.runners.lowrank import run_lowrank
from polmctl.runners.merge import run_merge
from polmctl.runners.pipeline import run_pipeline
from polmctl.runners.prune import run_prune
from polmctl.runners.quantize import run_quantize
from polmctl.runners.train import run_train
from polmctl.runners.vlm import run_vlm

RUNNERS: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    "train": run_train,
    "evaluate": run_evaluate,
    "prune": run_prune,
    "quantize": run_quantize,
    "lowrank": run_lowrank,
    "pipeline": run_pipeline,
    "vlm": run_vlm,
    "merge": run_merge,
    "edit": run_edit,
}
