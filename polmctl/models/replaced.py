"""Model dirs whose Linear layers polmctl replaced: low-rank factors (recipe=lowrank), HQQ and torchao
int4 weights (recipe=quantize method.scheme=hqq4 | int4). ``polmctl.models.load_model`` loads them
like any model dir (``polmctl eval``, ``chat``, ``run model.name_or_path=<dir>``).

    final/config.json                  the architecture's own config, unchanged
    final/polmctl_layers.json          which Linear layers are replaced, by what, and their shapes
    final/polmctl_model.safetensors    every tensor of the model: replaced layers under their own keys
    final/tokenizer*, generation_config.json

Why a format of our own: transformers builds a model from its config, and a config cannot say "this
Linear is two Linears" or "this weight is HQQ's packed int4" without custom code that
``trust_remote_code`` would have to run (and every reader would need). The HQQ library saves with
``torch.save`` (a pickle) and torchao's safetensors support does not cover its CPU int4 tensor
(``Int4OpaqueTensor``). So the layers file names the replacements, the loader rebuilds the
architecture from config.json, swaps those modules in and loads plain safetensors into it: nothing
is unpickled. A torchao tensor is stored as its inner tensors and rebuilt through torch's
tensor-subclass protocol (``__tensor_unflatten__``), only for the classes in ``TORCHAO_CLASSES``.
There is deliberately no model.safetensors: transformers' ``from_pretrained`` refuses the dir
("no file named model.safetensors") instead of loading random weights into the replaced layers. For
a dir any transformers loads, recipe=lowrank has method.save_format=dense (the factors multiplied back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polmctl.errors import ModelError

LAYERS_FILE = "polmctl_layers.json"
WEIGHTS_FILE = "polmctl_model.safetensors"
FORMAT = 1
TORCHAO_CLASSES = ("Int4OpaqueTensor",)


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a Linear [out, in] replaced by its rank-``rank`` factors, ``down`` [rank, in]
    (no bias) and ``up`` [out, rank] (the original bias). ``in_features`` / ``out_features`` as nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight the factors stand for."""
        return self.up.weight @ self.down.weight


def _torchao_weight(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ in TORCHAO_CLASSES


def layer_spec(module: nn.Module) -> dict[str, Any] | None:
    """What ``polmctl_layers.json`` records about a replaced module (None: not replaced)."""
    if isinstance(module, LowRankLinear):
        return {
            "kind": "lowrank",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "rank": module.rank,
            "bias": module.up.bias is not None,
        }
    if type(module).__name__ == "HQQLinear":
        return {"kind": "hqq", "compute_dtype": str(module.compute_dtype).removeprefix("torch.")}
    if _torchao_weight(module):
        weight = module.weight
        names, attributes = weight.__tensor_flatten__()
        return {
            "kind": "torchao",
            "class": type(weight).__name__,
            "tensors": list(names),
            "attributes": {k: list(v) if isinstance(v, (tuple, torch.Size)) else v for k, v in attributes.items()},
            "bias": module.bias is not None,
        }
    return None


def replaced_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: spec}`` of the model's replaced layers (the base model's names, as its state dict)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = {}
    for name, module in base.named_modules():
        spec = layer_spec(module)
        if spec is not None:
            found[name] = spec
    return found


def is_replaced_dir(path: str | Path) -> bool:
    return (Path(path) / LAYERS_FILE).is_file()


def save_replaced(model: nn.Module, out_dir: Path) -> None:
    """Write config.json, the layers file and the weights of a model with replaced layers into ``out_dir``."""
    from safetensors.torch import save_file

    layers = replaced_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in layers and layers[module_name]["kind"] == "torchao" and leaf == "weight":
            for inner in layers[module_name]["tensors"]:
                tensors[f"{key}.{inner}"] = getattr(value, inner).detach().contiguous().cpu()
            continue
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{key} is a {type(value).__name__}, not a tensor; it cannot be written as safetensors")
        storage = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and storage in owner:  # tied weights (lm_head = embed_tokens) are stored once
            tied[key] = owner[storage]
            continue
        owner[storage] = key
        tensors[key] = value.detach().contiguous().cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    spec = {"format": FORMAT, "layers": layers, "tied": tied}
    (out_dir / LAYERS_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def _build_layer(spec: dict[str, Any], old: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    kind = spec["kind"]
    if kind == "lowrank":
        return LowRankLinear(
            spec["in_features"], spec["out_features"], spec["rank"], spec["bias"], dtype=dtype, device=device
        )
    if kind == "hqq":
        HQQLinear = _import_hqq()
        compute = getattr(torch, spec["compute_dtype"])
        return HQQLinear(None, quant_config=None, compute_dtype=compute, device=str(device), initialize=False)
    if kind == "torchao":
        if spec["class"] not in TORCHAO_CLASSES:
            raise ModelError(f"torchao tensor class {spec['class']!r} is not one polmctl loads ({TORCHAO_CLASSES})")
        return old  # the Linear stays; its weight is rebuilt from the stored inner tensors
    raise ModelError(f"unknown replaced layer kind {kind!r} in {LAYERS_FILE}; re-save the model with this polmctl")


def _import_hqq():
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        raise ModelError("this model dir holds HQQ-quantized layers: pip install hqq (polmctl's quant extra)") from None
    return HQQLinear


def _torchao_class(name: str):
    try:
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    except ImportError:
        raise ModelError("this model dir holds torchao int4 layers: pip install 'torchao>=0.15'") from None
    return {"Int4OpaqueTensor": Int4OpaqueTensor}[name]


def load_replaced(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    head: str = "causal_lm",
    quantization: str = "none",
) -> nn.Module:
    """The causal LM of a dir written by ``save_replaced``, on ``device``, weights as saved."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path, device = Path(path), torch.device(device)
    if head != "causal_lm":
        raise ModelError(f"{path} holds a causal LM with replaced layers; it cannot load as a {head} model")
    if quantization != "none":
        raise ModelError(
            f"{path} holds replaced (low-rank or already quantized) layers; load it with model.quantization=none"
        )
    spec = json.loads((path / LAYERS_FILE).read_text())
    if spec.get("format") != FORMAT:
        raise ModelError(f"{path / LAYERS_FILE} has format {spec.get('format')!r}; this polmctl reads {FORMAT}")
    if any(s["kind"] == "torchao" for s in spec["layers"].values()) and device.type != "cpu":
        raise ModelError(f"{path} holds torchao CPU int4 weights (Int4OpaqueTensor); load it on the CPU")
    config = AutoConfig.from_pretrained(path)
    with no_init_weights():  # every weight comes from the file
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, layer in spec["layers"].items():
        model.set_submodule(name, _build_layer(layer, model.get_submodule(name), dtype, device))
    model.to(device)
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    rebuilt = set()
    for name, layer in spec["layers"].items():
        if layer["kind"] == "torchao":
            _load_torchao_weight(model.get_submodule(name), name, layer, state)
            rebuilt.add(f"{name}.weight")
    tied = spec.get("tied", {})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in rebuilt and k not in tied]
    if missing or unexpected:
        raise ModelError(
            f"{path / WEIGHTS_FILE} does not match {config.model_type}'s layers (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); the dir is damaged or from another model"
        )
    model.tie_weights()
    tensors = model.state_dict(keep_vars=True)
    for key, source in tied.items():  # a tie the architecture does not make itself: the same values
        if tensors[key].data_ptr() != tensors[source].data_ptr():
            with torch.no_grad():
                tensors[key].copy_(tensors[source])
    model.config._name_or_path = model.name_or_path = str(path)  # what an adapter trained on it names as base
    return model


def _load_torchao_weight(module: nn.Module, name: str, layer: dict, state: dict[str, torch.Tensor]) -> None:
    cls = _torchao_class(layer["class"])
    inner = {t: state.pop(f"{name}.weight.{t}") for t in layer["tensors"]}
    attributes = dict(layer["attributes"])
    if "shape" in attributes:
        attributes["shape"] = torch.Size(attributes["shape"])
    shape = attributes.get("shape", module.weight.shape)
    weight = cls.__tensor_unflatten__(inner, attributes, shape, None)
    module.weight = nn.Parameter(weight, requires_grad=False)
