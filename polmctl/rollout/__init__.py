"""Batched generation (and, for online methods, reward scoring)."""

from polmctl.rollout.generate import generate

__all__ = ["generate"]
