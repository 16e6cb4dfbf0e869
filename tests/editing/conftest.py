"""The toy facts model (tests/editing/facts_model.py), trained once per test session."""

from __future__ import annotations

import pytest

from tests.editing.facts_model import build_facts_model


@pytest.fixture(scope="session")
def facts_model_dir(tmp_path_factory):
    return build_facts_model(tmp_path_factory.getbasetemp() / "facts-model")
