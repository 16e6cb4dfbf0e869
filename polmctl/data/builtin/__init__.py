"""Builtin data sources (``builtin:<name>``): generated, deterministic by seed, with train
and test splits that never overlap."""

from __future__ import annotations

from typing import Callable

from polmctl.data.builtin.arithmetic import arithmetic, extract_answer
from polmctl.data.builtin.domain_text import domain_text
from polmctl.data.builtin.instructions import instructions

BUILTIN_SOURCES: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": arithmetic,
    "instructions": instructions,
    "domain_text": domain_text,
}

__all__ = ["BUILTIN_SOURCES", "extract_answer"]
