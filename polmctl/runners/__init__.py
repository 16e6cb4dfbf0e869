"""Runners by name (the ``runner`` config key). A runner loads, applies, writes; nothing more."""

from __future__ import annotations

from typing import Any, Callable

from polmctl.config.schema import RunConfig
from polmctl.runners.evaluate import run_evaluate
from polmctl.runners.train import run_train

RUNNERS: dict[str, Callable[[RunConfig], dict[str, Any]]] = {
    "train": run_train,
    "evaluate": run_evaluate,
}
