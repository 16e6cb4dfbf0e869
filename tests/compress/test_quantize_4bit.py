"""4-bit weights on CPU beyond bitsandbytes: torchao's group-wise int4 (method.scheme=cpu_int4) and HQQ
(method.scheme=hqq). Each quantizes the tiny model's decoder Linears, saves in polmctl's replaced-layer
layout (plain safetensors, nothing pickled), reloads through load_model to the same outputs, generates,
and takes less memory."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from polmctl.compress import quantize as Q
from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError
from polmctl.methods.quantize import QuantizeMethod
from polmctl.models import load_model, load_tokenizer, resolve_model_path, save_model
from polmctl.models.replaced import LAYERS_FILE, WEIGHTS_FILE
from polmctl.rollout import generate

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")
IDS = torch.tensor([[5, 60, 7, 80, 9, 100, 33, 12]])
PROMPTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n", "12 * 7 ="]
KIND = {"cpu_int4": "Linear[Int4OpaqueTensor]", "hqq": "HQQLinear"}


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(name_or_path="builtin:tiny")
    return resolve_model_path(cfg.name_or_path), load_tokenizer(cfg), load_model(cfg, for_training=False)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("scheme", ["cpu_int4", "hqq"])
def test_4bit_scheme_saves_reloads_generates_and_shrinks(scheme, tiny, tmp_path):
    path, tok, full = tiny
    method = QuantizeMethod(scheme=scheme, group_size=32)
    Q.check_backend(scheme, CPU)
    quantized = Q.quantize_model(path, method, device=CPU, dtype=torch.float32)
    assert Q.quantized_layers(quantized) == {KIND[scheme]: 14}  # q, k, v, o, gate, up, down x 2; lm_head stays
    assert "lm_head" in Q.full_precision_linears(quantized)
    # Relative error of the (centred) logits against the full-precision model's: measured 0.084 (int4) and
    # 0.088 (hqq) at 4 bits; hqq at 8 bits gives 0.005 and at 2 bits 0.39.
    reference = logits(full)
    error = (logits(quantized) - reference).norm() / (reference - reference.mean(-1, keepdim=True)).norm()
    assert 0 < error < 0.15, error
    tokens = generate(quantized, tok, PROMPTS, max_new_tokens=8, batch_size=2, decode=False)

    out = save_model(quantized, tok, tmp_path / "q")
    spec = json.loads((out / LAYERS_FILE).read_text())
    assert len(spec["layers"]) == 14 and not (out / "model.safetensors").exists()
    assert Q.dir_quantization(out) == {"cpu_int4": "torchao int4", "hqq": "hqq"}[scheme]
    reloaded = load_model(ModelConfig(name_or_path=str(out)), for_training=False)
    assert Q.quantized_layers(reloaded) == {KIND[scheme]: 14}
    torch.testing.assert_close(logits(reloaded), logits(quantized), rtol=0, atol=0)
    assert generate(reloaded, tok, PROMPTS, max_new_tokens=8, batch_size=2, decode=False) == tokens

    # 73,728 decoder weights at 4 bits plus a scale and zero point per 32; the embeddings (tied) and
    # norms stay float32: ideal 0.31 of the bytes, measured 0.33 (int4) / 0.36 (hqq, float32 metadata)
    memory = Q.parameter_bytes(reloaded) / Q.parameter_bytes(full)
    assert memory < 0.4, memory
    assert Q.weights_bytes(out) / Q.weights_bytes(path) < 0.45


def test_safetensors_hold_only_plain_tensors_and_no_pickle(tiny, tmp_path):
    from safetensors import safe_open

    path, tok, _ = tiny
    out = save_model(
        Q.quantize_model(path, QuantizeMethod(scheme="cpu_int4"), device=CPU, dtype=torch.float32), tok, tmp_path / "q"
    )
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".bin", ".pkl")) == []
    with safe_open(str(out / WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight.qdata" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


@pytest.mark.parametrize(
    "method,message",
    [
        (QuantizeMethod(scheme="nf4", bits=2), "method.bits: only hqq / gptq / awq read it"),
        (QuantizeMethod(scheme="hqq", bits=5), "method.bits: got 5; allowed: 1, 2, 3, 4, 8"),
        (QuantizeMethod(scheme="cpu_int4", group_size=48), "method.group_size: got 48; allowed: 32, 64, 128"),
        (QuantizeMethod(scheme="hqq", group_size=12), "method.group_size: hqq needs a positive multiple of 8"),
        (QuantizeMethod(scheme="int8", group_size=128), "method.group_size: only cpu_int4, hqq, gptq and awq read it"),
    ],
)
def test_bad_4bit_values_name_the_key(method, message):
    with pytest.raises(ConfigError, match=message):
        method.check("method")


def test_missing_hqq_names_the_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    with pytest.raises(ConfigError, match="method.scheme: hqq needs the hqq library: pip install hqq"):
        Q.check_backend("hqq", CPU)


def test_cpu_int4_is_for_the_cpu():
    with pytest.raises(ConfigError, match="trainer.device: method.scheme=cpu_int4 quantizes for CPU inference"):
        Q.check_backend("cpu_int4", torch.device("cuda"))


def test_hqq_fits_only_weights_it_can_pack():
    """At 4 bits hqq packs two 64-wide groups into one stored row: an odd count does not pack."""
    assert Q.hqq_fits((26, 64), 4, 64) and not Q.hqq_fits((25, 64), 4, 64) and Q.hqq_fits((25, 64), 4, 32)
    assert Q.hqq_fits((25, 64), 8, 64) and not Q.hqq_fits((10, 60), 4, 64)  # 600 is no multiple of 64


def test_cpu_int4_computes_in_bfloat16_unless_told_otherwise():
    """torch's CPU int4 matmul is slow on float32 activations (benchmarks/int4_cpu_matmul.py)."""
    assert Q.load_dtype(QuantizeMethod(scheme="cpu_int4"), "float32", CPU) == torch.bfloat16
    assert Q.load_dtype(QuantizeMethod(scheme="cpu_int4", compute_dtype="float32"), "auto", CPU) == torch.float32
    assert Q.load_dtype(QuantizeMethod(scheme="hqq"), "float32", CPU) == torch.float32
