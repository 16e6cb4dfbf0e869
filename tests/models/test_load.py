"""Loading the tokenizer and model from a ModelConfig: pad token, chat template, dtype, modes, checkpointing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.errors import ModelError
from polmctl.models import load_model, load_model_and_tokenizer, load_tokenizer
from polmctl.models.tiny import CHATML_TEMPLATE

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
IDS = torch.tensor([[5, 6, 7, 8, 9]])


def test_tokenizer_has_a_pad_token_pads_right_and_keeps_the_chat_template():
    tok = load_tokenizer(TINY)
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"
    assert tok.chat_template == CHATML_TEMPLATE


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    from polmctl.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_chat_template_override_inline_or_from_a_file(tmp_path):
    inline = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert load_tokenizer(ModelConfig(name_or_path="builtin:tiny", chat_template=inline)).chat_template == inline
    path = tmp_path / "plain.jinja"
    path.write_text(inline)
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny", chat_template=str(path)))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "user: hi\n"


def test_a_chat_template_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="neither a Jinja template nor an existing file"):
        load_tokenizer(ModelConfig(name_or_path="builtin:tiny", chat_template=str(tmp_path / "missing.jinja")))


def test_dtype_auto_is_float32_on_cpu_and_explicit_dtypes_apply():
    assert load_model(TINY).dtype == torch.float32
    assert load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16")).dtype == torch.bfloat16


def test_training_and_inference_modes():
    train = load_model(TINY, for_training=True)
    assert train.training and all(p.requires_grad for p in train.parameters())
    infer = load_model(TINY, for_training=False)
    assert not infer.training and not any(p.requires_grad for p in infer.parameters())


def test_attn_implementation_is_passed_to_transformers():
    model = load_model(ModelConfig(name_or_path="builtin:tiny", attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"


def test_gradient_checkpointing_is_enabled_non_reentrant_with_input_grads():
    model = load_model(ModelConfig(name_or_path="builtin:tiny", gradient_checkpointing=True))
    assert model.is_activation_checkpointing
    checkpoint_fn = model.model.layers[0]._gradient_checkpointing_func
    assert checkpoint_fn.keywords == {"use_reentrant": False}
    assert model.get_input_embeddings()(IDS).requires_grad  # the input-grads hook is on
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_load_model_and_tokenizer_returns_both():
    model, tok = load_model_and_tokenizer(TINY, for_training=False)
    assert model.config.vocab_size == len(tok) and not model.training


def test_models_load_without_hub_kernels():
    # transformers kernelizes a load with code from the hub unless USE_HUB_KERNELS says no; offline on a
    # GPU that fails every load (polmctl/__init__.py). With YES this same load comes back kernelized.
    import os

    assert os.environ["USE_HUB_KERNELS"] == "NO"
    assert load_model(TINY).use_kernels is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_it_is_an_error():
    with pytest.raises(ModelError, match="CUDA is not available"):
        load_model(TINY, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_dtype_on_a_gpu_is_bfloat16_where_supported():
    model = load_model(TINY, device="cuda")  # model.dtype=auto_gpu: bf16 from compute capability 8.0 (Ampere)
    expected = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float32
    assert model.dtype == expected and model.device.type == "cuda"


@pytest.fixture()
def cudnn_sdp_restored():
    was = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(was)


def test_no_cudnn_attention_turns_the_backend_off_and_says_whether_it_was_on(cudnn_sdp_restored):
    from polmctl.models.precision import no_cudnn_attention

    torch.backends.cuda.enable_cudnn_sdp(True)
    assert no_cudnn_attention() is True and not torch.backends.cuda.cudnn_sdp_enabled()
    assert no_cudnn_attention() is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bf16_model_on_a_gpu_attends_without_cudnn(cudnn_sdp_restored):
    torch.backends.cuda.enable_cudnn_sdp(True)
    model = load_model(replace(TINY, dtype="bfloat16"), device="cuda", for_training=False)
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
    assert torch.isfinite(model(ids).logits.float()).all()
