"""Evaluation only, no training: the run's eval tasks on model.name_or_path (the evaluate runner,
polmctl/runners/evaluate.py).

    polmctl eval outputs/lora/2026-11-24/10-00-00                 # a run dir: its final/, its own eval tasks
    polmctl eval builtin:smollm2-135m eval.tasks=[arithmetic,perplexity]
"""

from __future__ import annotations

from dataclasses import dataclass

from polmctl.config.schema import option


@dataclass
class EvaluateMethod:
    name: str = option("evaluate", "evaluate: run eval.tasks on model.name_or_path, train nothing (polmctl eval)")
