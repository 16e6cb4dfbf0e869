"""Write a Llama-family causal LM and its tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio).

    polmctl export outputs/lora/2026-11-24/10-00-00 --merge-adapters --format gguf --out model.gguf
    polmctl export builtin:smollm2-135m --format gguf --gguf-type q8_0 --out smollm2-q8_0.gguf

The file is written with the maintained ``gguf`` package (GGUFWriter, its tensor-name map and
its Q8_0 quantizer). What the ``gguf`` package does not do is the part of llama.cpp's
convert_hf_to_gguf.py that is specific to a model family; for Llama that is three things,
written here: the hyperparameter keys, the Q/K row permutation (llama.cpp's rotary embedding
pairs neighbouring rows, Hugging Face's pairs the two halves of each head), and the byte-level
BPE tokenizer metadata (tokens, token types, merges, special ids, chat template).
transformers reads the file back (``from_pretrained(dir, gguf_file=name)``) by undoing exactly
these steps (transformers/modeling_gguf_pytorch_utils.py, integrations/gguf/).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from polmctl.errors import ModelError

# --gguf-type -> (tensor type of 2-d weights, the file type recorded in general.file_type)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_FAMILY = ("llama",)


def _types(outtype: str):
    import gguf

    return {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }[outtype]


def check_gguf_model(model) -> None:
    """Refuse, with the reason, a model that this writer cannot turn into a GGUF that loads back."""
    if hasattr(model, "peft_config"):
        raise ModelError(
            "GGUF holds one full model, not a peft adapter: export with --merge-adapters (lora and dora adapters merge)"
        )
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        raise ModelError(
            "the model is quantized (bitsandbytes / torchao); GGUF export needs full-precision weights: "
            "export the run it was quantized from, with --gguf-type q8_0 for a smaller file"
        )
    if config.model_type not in LLAMA_FAMILY or not type(model).__name__.endswith("ForCausalLM"):
        raise ModelError(
            f"GGUF export supports Llama-family causal LMs ({', '.join(LLAMA_FAMILY)}); this model is "
            f"{type(model).__name__} (model_type={config.model_type}): export it as a Hugging Face dir"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError(
            "GGUF export: this Llama has attention/MLP biases, which transformers does not read back "
            "from a llama GGUF; export it as a Hugging Face dir"
        )
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise ModelError(
            f"GGUF export: rope scaling {rope.get('rope_type')!r} is not written; only the default "
            "rotary embedding is supported (export it as a Hugging Face dir)"
        )


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _write_hparams(writer, config, outtype: str, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_types(outtype)[1])
    writer.add_quantization_version(2)


def permute_qk(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py LlamaModel.permute): within each head,
    the rows of the two rotary halves are interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_tensors(writer, model, outtype: str) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qtype = _types(outtype)[0]
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight in the file: readers tie it to token_embd
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ModelError(f"GGUF export: tensor {hf_name} has no llama.cpp name; this is not a plain Llama model")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_name.endswith(".attn_q"):
            data = permute_qk(data, config.num_attention_heads)
        elif gguf_name.endswith(".attn_k"):
            data = permute_qk(data, config.num_attention_heads, config.num_key_value_heads)
        # As llama.cpp: 1-d tensors (norms) stay f32; Q8_0 needs rows that are whole 32-value blocks.
        tensor_type = qtype if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        if tensor_type == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            tensor_type = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, tensor_type)
        writer.add_tensor(f"{gguf_name}.{suffix}", packed, raw_dtype=tensor_type)


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer (tokenizers JSON)."""
    if pre and pre.get("type") == "ByteLevel":
        return "gpt2"  # GPT-2's split regex (a vocabulary without merges tokenizes the same either way)
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = steps[0].get("pattern", {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise ModelError(
        f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp name; "
        "only byte-level BPE tokenizers with a known split are written (export as a Hugging Face dir)"
    )


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError(
            f"GGUF export supports byte-level BPE tokenizers (tokenizer.ggml.model=gpt2); this one is "
            f"{spec['model']['type']} with a {(spec.get('decoder') or {}).get('type')} decoder"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    by_id = {i: t for t, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ModelError(
            f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
            "resize the model's embeddings to the tokenizer"
        )
    added = {a["id"]: a["special"] for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces are padding rows of the embedding
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.NORMAL
                if i not in added
                else gguf.TokenType.CONTROL
                if added[i]
                else gguf.TokenType.USER_DEFINED
            )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    else:
        # GGUF cannot hold an empty array; a reader then derives merges from token scores, and a
        # vocabulary of single bytes (plus whole special tokens) derives none.
        writer.add_token_scores([0.0] * vocab_size)
    for token, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(token_id)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bool(bos is not None and len(full) > len(plain) and full[0] == bos))
    writer.add_add_eos_token(bool(eos is not None and len(full) > len(plain) and full[-1] == eos))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, out_path: str | Path, *, outtype: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a Llama ``*ForCausalLM``) and ``tokenizer`` to ``out_path`` as GGUF.

    Written into ``<out>.tmp-<pid>`` first and renamed into place when complete.
    """
    import os

    import gguf

    if outtype not in GGUF_TYPES:
        raise ModelError(f"--gguf-type {outtype!r}: use one of {', '.join(GGUF_TYPES)}")
    check_gguf_model(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _write_hparams(writer, model.config, outtype, name or out_path.stem)
        _write_tokenizer(writer, tokenizer, model.config.vocab_size)
        _write_tensors(writer, model, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out_path
