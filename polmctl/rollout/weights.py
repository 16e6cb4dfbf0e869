"""The weights a trainer pushes to a rollout server, as the server receives them: named tensors in
safetensors bytes, under the base model's parameter names (what ``from_pretrained`` loads).

    body = pack({"model.norm.weight": w}, kind="full", commit="false")   # bytes, never a pickle
    tensors, meta = unpack(body)                                          # meta == {"kind": "full", ...}
    for chunk in chunked(base_weights(model), 256 * 2**20): ...          # requests of at most 256 MiB

``base_weights`` names a peft model's weights as its base model names them (peft's
``base_model.model.`` prefix and ``.base_layer`` removed, the adapters' own tensors left out, a
``modules_to_save`` copy in place of the original), the names vLLM's ``load_weights`` and the
server's transformers model both take.
"""

from __future__ import annotations

import json
import struct
from typing import Iterable, Iterator

import torch

MAX_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header


def base_name(name: str, peft: bool, adapter_prefix: str | None = None) -> str | None:
    """``name`` as the base model names it, or None for a tensor that is not the base model's
    (a peft adapter's own weights, the frozen original of a ``modules_to_save`` module)."""
    name = name.replace("_checkpoint_wrapped_module.", "")
    if not peft:
        return name
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if (adapter_prefix and adapter_prefix in name) or "original_module" in name:
        return None
    return name.replace("modules_to_save.default.", "")


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_weights(model, only_trainable: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(base name, parameter)`` of every weight of ``model`` (a plain or peft model) that the base
    model has; ``only_trainable``: those with ``requires_grad`` only."""
    peft = is_peft(model)
    prefix = getattr(model, "prefix", None) if peft else None
    for name, param in model.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        name = base_name(name, peft, prefix)
        if name is not None:
            yield name, param


def pack(tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    """safetensors bytes of ``tensors`` (copied to the CPU) with string ``metadata`` in the header."""
    from safetensors.torch import save

    return save({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, metadata=metadata)


def unpack(body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``pack``'s tensors and metadata back. Raises ValueError on bytes that are not safetensors."""
    from safetensors.torch import load

    # safetensors reads metadata only from files (safe_open); from bytes it is read here: an 8-byte
    # little-endian header length, then the JSON header, whose "__metadata__" holds the strings.
    if len(body) < 8:
        raise ValueError("not safetensors bytes: shorter than the 8-byte header length")
    (size,) = struct.unpack("<Q", body[:8])
    if size > MAX_HEADER or 8 + size > len(body):
        raise ValueError(f"not safetensors bytes: header length {size} for a body of {len(body)} bytes")
    try:
        header = json.loads(body[8 : 8 + size])
        tensors = load(body)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(f"not safetensors bytes: {err}") from None
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def chunked(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """``named`` in groups of at most ``max_bytes`` (a tensor larger than that is a group of its own)."""
    group: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > max_bytes:
            yield group
            group, size = {}, 0
        group[name] = tensor
        size += nbytes
    if group:
        yield group


def shapes(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in named}
