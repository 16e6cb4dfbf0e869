"""Builtin data sources (``builtin:<name>``): generated, deterministic by a ``seed``
option, with train and test splits that never overlap.

Each generator is ``function(split, **options) -> list[dict]``; its keyword arguments
are the options ``data.options`` may set (``load_rows`` rejects any other name).
"""

from __future__ import annotations

from typing import Callable

from polmctl.data.builtin.answers import extract_answer
from polmctl.data.builtin.arithmetic import arithmetic
from polmctl.data.builtin.domain_text import domain_text
from polmctl.data.builtin.facts import facts
from polmctl.data.builtin.instructions import instructions
from polmctl.data.builtin.preference import arithmetic_feedback, arithmetic_preference, style_preference
from polmctl.data.builtin.reversal import reversal
from polmctl.data.builtin.shapes import shapes
from polmctl.data.builtin.steps import arithmetic_step_pairs, arithmetic_steps

BUILTIN_SOURCES: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": arithmetic,
    "instructions": instructions,
    "domain_text": domain_text,
    "arithmetic_preference": arithmetic_preference,
    "style_preference": style_preference,
    "arithmetic_feedback": arithmetic_feedback,
    "shapes": shapes,
    "reversal": reversal,
    "facts": facts,
    "arithmetic_steps": arithmetic_steps,
    "arithmetic_step_pairs": arithmetic_step_pairs,
}

__all__ = ["BUILTIN_SOURCES", "extract_answer"]
