"""bf16 compute (models/precision.py): which dtype ``auto`` picks and why, float32 trainables and
optimizer state under bf16 weights, the LM head's contiguous input, the fused LoRA in bf16.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/models/test_precision.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polmctl.config.schema import ModelConfig, PeftConfig
from polmctl.models import apply_peft, load_model, precision
from polmctl.models.forward import token_logps
from polmctl.models.fused_lora import FusedLoraVariant
from polmctl.models.precision import choose_dtype, contiguous_head_input, float32_trainables

pytestmark = pytest.mark.unit
CPU = torch.device("cpu")


def test_explicit_dtypes_are_taken_as_given():
    for name in ("float32", "bfloat16", "float16"):
        assert choose_dtype(name, CPU) == (getattr(torch, name), f"model.dtype={name}")


def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AVX512-BF16", "AMX-BF16"])
    dtype, why = choose_dtype("auto", CPU)
    assert dtype == torch.bfloat16 and "AVX512-BF16 and AMX-BF16" in why
    dtype, why = choose_dtype("auto_gpu", CPU)  # the default keeps CPUs in float32, and says what auto would do
    assert dtype == torch.float32 and "model.dtype=auto would train in bf16" in why
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    assert choose_dtype("auto", CPU) == (torch.float32, "this CPU has neither AVX512-BF16 nor AMX-BF16")


@pytest.mark.parametrize(
    ("capability", "expected"), [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float32)]
)
def test_auto_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for name in ("auto", "auto_gpu"):
        dtype, why = choose_dtype(name, torch.device("cuda"))
        assert dtype == expected and f"{capability[0]}.{capability[1]}" in why


def test_this_machine_s_cpu_flags_are_read():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(cpuinfo.read_text().split())
    expected = [label for flag, label in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    assert precision.cpu_bf16_features() == expected


def test_auto_loads_the_dtype_it_chose_and_logs_why_once(capsys):
    precision.say_dtype_choice.cache_clear()
    expected, why = choose_dtype("auto", CPU)
    for _ in range(2):
        assert load_model(ModelConfig(name_or_path="builtin:tiny", dtype="auto")).dtype == expected
    out = capsys.readouterr().err  # polmctl's console prints to stderr
    assert out.count("model.dtype=auto ->") == 1 and why.split(" (")[0] in out


def _step(model, ids):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    logps, mask = token_logps(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss = -(logps * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    return loss, optimizer


def _assert_mixed(model, optimizer):
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    states = [s for state in optimizer.state.values() for s in state.values() if s.dim() > 0]
    assert states and all(s.dtype == torch.float32 for s in states)


def test_bf16_lora_trains_float32_adapters_on_bf16_weights():
    model = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16"))
    model = apply_peft(model, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    loss, optimizer = _step(model, torch.randint(5, 200, (2, 12)))
    assert loss.dtype == torch.float32  # log-probs reduced in float32
    _assert_mixed(model, optimizer)


def test_bf16_full_fine_tune_keeps_float32_weights_and_computes_in_bf16():
    model = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16"))
    model = apply_peft(model, PeftConfig(method="none"))
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16  # autocast: bf16 matmuls
    loss, optimizer = _step(model, ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    _assert_mixed(model, optimizer)


def test_a_bf16_reward_model_s_copied_score_head_is_float32():
    model = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16"), head="reward")
    model = apply_peft(model, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable)  # peft's modules_to_save copy of the head
    assert all(p.dtype == torch.float32 for p in trainable.values())
    ids = torch.randint(5, 200, (2, 8))
    scores = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    scores.float().sum().backward()
    assert all(p.grad is not None for n, p in trainable.items() if "score" in n)


def test_float32_trainables_leaves_a_float32_model_alone(tiny_model):
    forward = tiny_model.forward
    assert float32_trainables(tiny_model) == 0 and tiny_model.forward == forward


def test_the_lm_head_gets_a_contiguous_input_and_the_same_logits(tiny_model):
    tiny_model.eval()
    ids = torch.randint(5, 200, (3, 10))
    head = tiny_model.get_output_embeddings()
    with torch.no_grad():
        before = tiny_model(input_ids=ids, logits_to_keep=1).logits
        assert contiguous_head_input(tiny_model)
        seen = []  # registered after polmctl's hook: sees what the head's matmul reads
        head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
        after = tiny_model(input_ids=ids, logits_to_keep=1).logits
    assert seen == [precision._compact_strides((3, 1, tiny_model.config.hidden_size))]
    strided = torch.zeros(3, 10, 8)[:, -1:]
    assert strided.stride() != precision._compact_strides(strided.shape)  # what transformers hands the head
    torch.testing.assert_close(after, before)


def test_fused_lora_in_bf16_matches_peft_s_own_expression():
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16"))
    model = apply_peft(model, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    layers = [m for m in model.modules() if getattr(m, "lora_variant", None)]
    assert all(isinstance(v, FusedLoraVariant) for m in layers for v in m.lora_variant.values())
    assert all(m.cast_input_dtype_enabled is False for m in layers)  # the variant casts A and B down instead
    ids = torch.randint(5, 200, (2, 9))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        return logits.float().detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_grads = run()
    for m in layers:
        m.lora_variant.clear()
        m.cast_input_dtype_enabled = True  # peft's own path: input up to float32, result back down
    plain, plain_grads = run()
    assert fused_grads.keys() == plain_grads.keys() and all(g.dtype == torch.float32 for g in fused_grads.values())
    torch.testing.assert_close(fused, plain, rtol=0.05, atol=0.05)  # bf16 rounding of A x and B (A x)
    for name in fused_grads:
        distance = (fused_grads[name] - plain_grads[name]).norm() / plain_grads[name].norm()
        assert distance < 0.05, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_a_gpu_trains_bf16_weights_with_float32_adapters_where_it_is_fast():
    capability = torch.cuda.get_device_capability()
    model = load_model(ModelConfig(name_or_path="builtin:tiny", dtype="auto"), device="cuda")
    expected = torch.bfloat16 if capability[0] >= 8 else torch.float32
    assert model.dtype == expected
    model = apply_peft(model, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0))
    loss, optimizer = _step(model, torch.randint(5, 200, (2, 12), device="cuda"))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    _assert_mixed(model, optimizer)
