"""A hub id with the hub out of reach: one ModelError line at once, or the local cache without waiting.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/models/test_hub.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused

LOAD = textwrap.dedent(
    """
    import json, sys, time
    from polmctl.config.schema import ModelConfig
    from polmctl.errors import ModelError
    from polmctl.models import load_model, load_tokenizer

    started = time.perf_counter()
    try:
        cfg = ModelConfig(name_or_path=sys.argv[1])
        tok = load_tokenizer(cfg)
        model = load_model(cfg, for_training=False)
        outcome = f"loaded {type(model).__name__} with vocab {len(tok)}"
    except ModelError as err:
        outcome = f"ModelError: {err}"
    print(json.dumps({"seconds": time.perf_counter() - started, "outcome": outcome}))
    """
)


def load_offline_hub(repo_id: str, hub_cache) -> dict:
    """Load ``repo_id`` in a fresh process whose hub endpoint refuses connections (HF_HUB_OFFLINE unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=DEAD_ENDPOINT, HF_HUB_CACHE=str(hub_cache), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", LOAD, repo_id], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path):
    """Before: huggingface_hub's retries took ~56 s, then a generic 'couldn't connect' error."""
    result = load_offline_hub("polmctl-test/not-cached", tmp_path / "hub")
    assert result["seconds"] < 10, result
    assert result["outcome"].startswith(
        f"ModelError: cannot load 'polmctl-test/not-cached' (tokenizer): the Hugging Face hub at {DEAD_ENDPOINT} "
        "cannot be reached (ConnectError"
    )
    assert "the local cache does not hold it" in result["outcome"] and "\n" not in result["outcome"]


def test_a_cached_model_loads_without_waiting_for_the_hub(tmp_path):
    from polmctl.models.tiny import write_tiny

    repo = tmp_path / "hub" / "models--polmctl-test--tiny"
    commit = "0" * 40
    write_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = load_offline_hub("polmctl-test/tiny", tmp_path / "hub")
    assert result["outcome"].startswith("loaded LlamaForCausalLM"), result
    assert result["seconds"] < 10, result


def test_a_reachable_hub_is_asked_as_before(monkeypatch):
    from huggingface_hub import constants

    from polmctl.models import hub

    monkeypatch.setattr(hub, "unreachable", lambda endpoint: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.hub_or_cache("org/model", "model") == "org/model"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: transformers fails fast itself
    monkeypatch.setattr(hub, "unreachable", lambda endpoint: pytest.fail("probed with HF_HUB_OFFLINE=1"))
    assert hub.hub_or_cache("org/model", "model") == "org/model"
