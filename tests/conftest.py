"""Shared fixtures: a private model cache, the tiny tokenizer and model."""

from __future__ import annotations

import pytest

from polmctl.models.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Builtin models materialise into one per-session cache, never the user's."""
    monkeypatch.setenv("POLMCTL_CACHE", str(tmp_path_factory.getbasetemp() / "polmctl-cache"))


@pytest.fixture(autouse=True)
def _allow_test_targets(monkeypatch):
    """Reward functions the tests name by ``_target_`` live in tests.*; a user allows their own package
    the same way (polmctl/targets.py). Tests of the allow-list itself set or clear it."""
    monkeypatch.setenv("POLMCTL_ALLOW_TARGETS", "tests")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer)
