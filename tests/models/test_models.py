"""Model resolution, loading, adapters and saving on the tiny model."""

from __future__ import annotations

import pytest
import torch

from polmctl.config.schema import ModelConfig, PeftConfig
from polmctl.errors import ModelError
from polmctl.models import (
    apply_peft,
    load_model,
    load_tokenizer,
    materialise_builtin,
    resolve_model_path,
    save_model,
    trainable_parameter_summary,
)
from polmctl.models.tiny import CHATML_TEMPLATE

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
IDS = torch.tensor([[5, 6, 7, 8, 9]])


def test_builtin_tiny_materialises_once_into_the_cache(tmp_path):
    first = materialise_builtin("tiny", str(tmp_path))
    stamp = (first / "config.json").stat().st_mtime_ns
    assert materialise_builtin("tiny", str(tmp_path)) == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path


def test_resolve_paths(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    assert resolve_model_path(str(run_dir)) == str(run_dir / "final")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="not found"):
        resolve_model_path(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="no model"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="builtin models: smollm2-135m, tiny"):
        resolve_model_path("builtin:gpt5")


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in the test
    with pytest.raises(ModelError, match="cannot load 'no-such-org/no-such-model'"):
        load_tokenizer(ModelConfig(name_or_path="no-such-org/no-such-model"))


def test_tokenizer_has_pad_and_template_override(tmp_path):
    tok = load_tokenizer(TINY)
    assert tok.pad_token is not None and tok.chat_template == CHATML_TEMPLATE and tok.padding_side == "right"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert (
        load_tokenizer(ModelConfig(name_or_path="builtin:tiny", chat_template=str(template))).chat_template
        == template.read_text()
    )


def test_dtype_is_applied():
    assert load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16")).dtype == torch.bfloat16
    assert load_model(TINY).dtype == torch.float32  # auto on CPU


@pytest.mark.parametrize("method", ["lora", "dora", "prompt_tuning", "prefix_tuning"])
def test_adapters_train_only_their_own_parameters(method):
    model = apply_peft(load_model(TINY), PeftConfig(method=method, r=4, num_virtual_tokens=4), load_tokenizer(TINY))
    trainable, total = trainable_parameter_summary(model)
    assert 0 < trainable < total
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    marker = {"lora": "lora_", "dora": "lora_", "prompt_tuning": "prompt_encoder", "prefix_tuning": "prompt_encoder"}[
        method
    ]
    assert all(marker in n for n in names), names[:3]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    assert all(
        not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n
    )


def test_full_finetuning_trains_everything():
    model = apply_peft(load_model(TINY), PeftConfig(method="none"))
    trainable, total = trainable_parameter_summary(model)
    assert trainable == total


@pytest.mark.parametrize("method,merge", [("none", False), ("lora", False), ("lora", True), ("prompt_tuning", False)])
def test_save_and_reload_gives_the_same_logits(tmp_path, method, merge):
    tok = load_tokenizer(TINY)
    model = apply_peft(load_model(TINY), PeftConfig(method=method, r=4, num_virtual_tokens=4), tok)
    with torch.no_grad():  # make the adapter non-trivial (LoRA B starts at zero)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    out = save_model(model, tok, tmp_path / "final", merge_adapters=merge)
    assert not list(tmp_path.glob("final.tmp-*"))
    assert ((out / "adapter_config.json").exists()) == (method != "none" and not merge)
    reloaded = load_model(ModelConfig(name_or_path=str(out)), for_training=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert load_tokenizer(ModelConfig(name_or_path=str(out))).chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_bitsandbytes_quantized_base_trains_lora(quantization):
    pytest.importorskip("bitsandbytes")
    cfg = ModelConfig(name_or_path="builtin:tiny", quantization=quantization)
    model = apply_peft(load_model(cfg), PeftConfig(method="lora", r=4))
    assert getattr(model.get_base_model(), "is_quantized", False)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_on_gpu_computes_in_bfloat16():
    cfg = ModelConfig(name_or_path="builtin:tiny", quantization="nf4")
    model = load_model(cfg, device="cuda")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.device.type == "cuda"
    model(input_ids=IDS.cuda())


def test_merging_into_a_quantized_base_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = apply_peft(
        load_model(ModelConfig(name_or_path="builtin:tiny", quantization="nf4")), PeftConfig(method="lora", r=4)
    )
    with pytest.raises(ModelError, match="quantized base"):
        save_model(model, load_tokenizer(TINY), tmp_path / "final", merge_adapters=True)
