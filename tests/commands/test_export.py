"""``polmctl export``: run dir, checkpoint and model sources; HF dir and GGUF; the refusals.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/commands/test_export.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from polmctl.commands.export import export
from polmctl.config.schema import ModelConfig
from polmctl.errors import ModelError
from polmctl.models import load_model

pytestmark = pytest.mark.cli

IDS = torch.tensor([[257, 84, 82, 68, 81, 198, 71, 68, 75, 75, 78]])


def polmctl(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polmctl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **env},
        timeout=300,
    )


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A finished LoRA run on model=tiny with a checkpoint at step 2 (a real `polmctl run`, so .hydra/ exists)."""
    run_dir = tmp_path_factory.mktemp("export") / "lora-run"
    result = polmctl(
        "run",
        "recipe=lora",
        "model=tiny",
        "eval=none",
        "eval.tasks=[]",
        "logger.progress=false",
        "data.max_rows=16",
        "trainer.max_steps=2",
        "trainer.save_every=2",
        "trainer.micro_batch_size=4",
        "trainer.lr=1e-2",
        "trainer.warmup_ratio=0",
        f"hydra.run.dir={run_dir}",
        POLMCTL_CACHE=str(tmp_path_factory.getbasetemp() / "polmctl-cache"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run_dir


def test_help_has_examples():
    for command in ("export", "plan"):
        result = polmctl(command, "--help")
        assert result.returncode == 0 and f"polmctl {command} " in result.stdout


def test_export_run_dir_merged_as_bfloat16(lora_run, tmp_path):
    out = tmp_path / "merged"
    result = polmctl("export", str(lora_run), "--merge-adapters", "--dtype", "bfloat16", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    adapter = load_model(ModelConfig(name_or_path=str(lora_run), dtype="float32"), for_training=False)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.bfloat16
    assert (logits(adapter) - logits(merged)).abs().max().item() < 0.05


def test_export_checkpoint_equals_final(lora_run, tmp_path):
    from_final = export(str(lora_run), tmp_path / "final", merge=True)
    from_ckpt = export(str(lora_run / "checkpoints" / "step-2"), tmp_path / "ckpt", merge=True)
    assert from_final["contents"] == from_ckpt["contents"] == "full model"
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    ckpt = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    base = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32"), for_training=False)
    assert torch.allclose(logits(final), logits(ckpt), atol=1e-5)  # step 2 is the last step
    assert not torch.allclose(logits(base), logits(ckpt), atol=1e-4)  # the trained weights were loaded


def test_export_adapter_unmerged_keeps_the_adapter(lora_run, tmp_path):
    result = export(str(lora_run), tmp_path / "adapter")
    assert result["contents"] == "peft adapter (not merged)"
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_export_gguf(lora_run, tmp_path):
    with pytest.raises(ModelError, match="add --merge-adapters"):
        export(str(lora_run), tmp_path / "a.gguf", fmt="gguf")
    result = polmctl(
        "export",
        str(lora_run),
        "--merge-adapters",
        "--format",
        "gguf",
        "--gguf-type",
        "f32",
        "--out",
        str(tmp_path / "lora.gguf"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    adapter = load_model(ModelConfig(name_or_path=str(lora_run), dtype="float32"), for_training=False)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="lora.gguf", dtype=torch.float32)
    assert (logits(adapter) - logits(back)).abs().max().item() < 1e-4


def test_push_to_hub_offline_fails_in_one_line(tmp_path):
    result = polmctl(
        "export", "builtin:tiny", "--out", str(tmp_path / "x"), "--push-to-hub", "me/tiny", HF_HUB_OFFLINE="1"
    )
    assert result.returncode != 0
    assert "HF_HUB_OFFLINE" in result.stderr and "Traceback" not in result.stderr


def test_refusals(tmp_path):
    from polmctl.models import materialise_builtin

    quantized = tmp_path / "quantized"
    shutil.copytree(materialise_builtin("tiny"), quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="quantized model .bitsandbytes nf4."):
        export(str(quantized), tmp_path / "q.gguf", fmt="gguf")
    with pytest.raises(ModelError, match="ending in .gguf"):
        export("builtin:tiny", tmp_path / "model", fmt="gguf")
    with pytest.raises(ModelError, match="already exists"):
        export("builtin:tiny", quantized)
    with pytest.raises(ModelError, match="no config.json"):
        export(str(tmp_path), tmp_path / "out")
