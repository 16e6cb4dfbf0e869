"""Reading and changing one module's input or output at chosen token positions, and the modules
knowledge editing works on (a Llama-style decoder: ``model.layers[i].mlp.down_proj``).

    polmctl run recipe=edit      (the callers: polmctl/editing/trace.py, rome.py, memit.py)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from polmctl.compress.prune import base_model, decoder_layers
from polmctl.data import pad_collate
from polmctl.errors import ConfigError, ModelError


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def check_layer(model: nn.Module, layer: int, key: str) -> int:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ConfigError(key, f"got {layer}; the model has {n} decoder layers, so use 0..{n - 1}")
    return layer


def decoder_layer(model: nn.Module, layer: int) -> nn.Module:
    return decoder_layers(model)[layer]


def mlp_down(model: nn.Module, layer: int) -> nn.Linear:
    """The MLP's output projection of decoder layer ``layer``: the key-value memory ROME edits
    (its input, the MLP's intermediate activation, is the key; its output the value)."""
    mlp = getattr(decoder_layer(model, layer), "mlp", None)
    down = getattr(mlp, "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise ModelError(
            f"{type(base_model(model)).__name__} has no Linear mlp.down_proj in its decoder layers; knowledge "
            "editing supports Llama-style MLPs (Llama, Mistral, Qwen, SmolLM2, ...)"
        )
    return down


def mlp(model: nn.Module, layer: int) -> nn.Module:
    return decoder_layer(model, layer).mlp


def _tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def patched_output(module: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While inside, ``module``'s output (its first element, for a tuple) is ``change(output)``."""

    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (change(output[0]), *output[1:])
        return change(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def recorded(module: nn.Module, which: str, store: dict) -> Iterator[None]:
    """While inside, ``store[which]`` holds ``module``'s last input (its first positional argument)
    or output."""

    def pre(mod, args):
        store["input"] = args[0]

    def post(mod, args, output):
        store["output"] = _tensor(output)

    handle = module.register_forward_pre_hook(pre) if which == "input" else module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def add_at(rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor):
    """A ``change`` that adds ``delta`` ([hidden] or [len(rows), hidden]) at ``(rows, positions)``."""

    def change(x: torch.Tensor) -> torch.Tensor:
        value = delta.to(x.dtype).expand(len(rows), x.shape[-1])
        return x.index_put((rows.to(x.device), positions.to(x.device)), value, accumulate=True)

    return change


def set_at(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor):
    """A ``change`` that writes ``values`` ([len(rows), hidden]) at ``(rows, positions)``."""

    def change(x: torch.Tensor) -> torch.Tensor:
        return x.index_put((rows.to(x.device), positions.to(x.device)), values.to(x.device, x.dtype))

    return change


def padded(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of token sequences, on ``device``."""
    batch = pad_collate([{"input_ids": s, "labels": s} for s in sequences], pad_token_id)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def values_at(
    model: nn.Module,
    module: nn.Module,
    which: str,
    sequences: list[list[int]],
    positions: list[int],
    pad_token_id: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """``module``'s input or output at ``positions[i]`` of ``sequences[i]``: [len(sequences), dim]."""
    device = device_of(model)
    found = []
    for i in range(0, len(sequences), batch_size):
        chunk, where = sequences[i : i + batch_size], torch.tensor(positions[i : i + batch_size])
        store: dict = {}
        with recorded(module, which, store):
            model(**padded(chunk, pad_token_id, device), use_cache=False)
        found.append(store[which][torch.arange(len(chunk)), where.to(device)].float())
    return torch.cat(found)
