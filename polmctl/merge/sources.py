"""Lazy per-tensor readers of the models to merge: a full model dir (one or sharded safetensors
files) or a LoRA adapter dir on a base model; run dirs resolve to their final/.

    polmctl run recipe=merge "method.models=[<lora run dir>,<full model dir>]" method.merge=linear

Tensors are read one at a time with ``safetensors.safe_open`` (memory-mapped), so a merge holds
only the current tensor of each input. A LoRA input's weight is computed per tensor as
``base + B @ A x scale`` (scale = alpha / r, or alpha / sqrt(r) with rsLoRA), the same update
``merge_and_unload`` adds; nothing else in peft reads one tensor at a time.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from polmctl.errors import ModelError
from polmctl.models import resolve_model_path

WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_PREFIX = "base_model.model."
LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?"
    r"\.weight$"
)


class FullModel:
    """The safetensors weights of a model dir, opened lazily."""

    def __init__(self, path: str | Path, label: str, stack: ExitStack):
        self.path, self.label = Path(path), label
        files = _weight_files(self.path, label)
        self.where: dict[str, object] = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            for key in handle.keys():
                self.where[key] = handle
        self.config = _read_json(self.path / "config.json", label)

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _slice_dtype(self.where[name], name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


class LoraAdapter:
    """A peft LoRA adapter dir: per base tensor name, its (A, B, scale) update, plus any whole
    tensors the adapter saved (modules_to_save), which replace the base's."""

    def __init__(self, path: str | Path, label: str, base: FullModel, stack: ExitStack):
        self.path, self.label, self.base = Path(path), label, base
        config = _read_json(self.path / "adapter_config.json", label)
        _refuse_unmergeable(config, label)
        file = self.path / "adapter_model.safetensors"
        if not file.is_file():
            raise ModelError(
                f"{label}: {self.path} has no adapter_model.safetensors (a .bin adapter?); re-save the "
                "adapter with safetensors"
            )
        self.handle = stack.enter_context(safe_open(str(file), framework="pt"))
        parts: dict[str, dict[str, str]] = {}
        self.replaced: dict[str, str] = {}  # base name -> adapter key of a whole saved tensor
        for key in self.handle.keys():
            if not key.startswith(ADAPTER_PREFIX):
                raise ModelError(
                    f"{label}: adapter tensor {key!r} does not start with {ADAPTER_PREFIX!r}; not a "
                    "peft adapter for a causal LM"
                )
            inner = key[len(ADAPTER_PREFIX) :]
            match = LORA_KEY.match(inner)
            if match:
                parts.setdefault(match["module"], {})[match["part"]] = key
            else:  # modules_to_save: <module>.modules_to_save.default.<param> is saved as <module>.<param>
                self.replaced[inner.replace(".modules_to_save.default", "")] = key
        self.updates: dict[str, tuple[str, str, float, bool]] = {}  # base name -> (A key, B key, scale, embedding)
        for module, found in parts.items():
            embedding = "lora_embedding_A" in found
            a, b = (
                (found.get("lora_embedding_A"), found.get("lora_embedding_B"))
                if embedding
                else (found.get("lora_A"), found.get("lora_B"))
            )
            if a is None or b is None:
                raise ModelError(
                    f"{label}: adapter module {module} has only one of its two LoRA matrices; the "
                    "adapter file is incomplete"
                )
            rank = self.handle.get_slice(a).get_shape()[0]
            self.updates[f"{module}.weight"] = (a, b, _scale(config, module, rank), embedding)
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        self.config = base.config
        self.base_path = base.path

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def check_against_base(self) -> None:
        """Every adapter tensor lands on a base tensor of the right shape (read from headers only)."""
        for name, key in self.replaced.items():
            _expect(name, key, self, tuple(self.handle.get_slice(key).get_shape()))
        for name, (a, b, _, embedding) in self.updates.items():
            a_shape, b_shape = self.handle.get_slice(a).get_shape(), self.handle.get_slice(b).get_shape()
            shape = (a_shape[1], b_shape[0]) if embedding or self.fan_in_fan_out else (b_shape[0], a_shape[1])
            _expect(name, a, self, shape)

    def tensor(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted weight ``name`` (float32 when adapted); ``base`` is this name's base tensor
        if the caller has read it already."""
        if name in self.replaced:
            return self.handle.get_tensor(self.replaced[name])
        base = self.base.tensor(name) if base is None else base
        if name not in self.updates:
            return base
        return base.float() + self.delta(name)

    def delta(self, name: str) -> torch.Tensor:
        a, b, scale, embedding = self.updates[name]
        update = self.handle.get_tensor(b).float() @ self.handle.get_tensor(a).float()
        return (update.T if embedding or self.fan_in_fan_out else update) * scale


def open_model(
    name_or_path: str, label: str, stack: ExitStack, cache_dir: str | None, bases: dict[str, FullModel]
) -> FullModel | LoraAdapter:
    """A reader for ``name_or_path``; LoRA adapters share one FullModel per base dir (``bases``)."""
    from polmctl.models.load import adapter_base

    path = _local_dir(name_or_path, label, cache_dir)
    base = adapter_base(path, cache_dir)
    if base is None:
        return FullModel(path, label, stack)
    base = str(_local_dir(base, f"the base of {label}", cache_dir))
    if base not in bases:
        bases[base] = FullModel(base, f"the base of {label} ({base})", stack)
    adapter = LoraAdapter(path, label, bases[base], stack)
    adapter.check_against_base()
    return adapter


def _local_dir(name_or_path: str, label: str, cache_dir: str | None) -> Path:
    try:
        path = resolve_model_path(name_or_path, cache_dir)
    except ModelError as err:
        raise ModelError(f"{label}: {err}") from None
    if not Path(path).is_dir():  # a hub id: from_pretrained's download, then its local snapshot
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        except Exception as err:  # noqa: BLE001 - any hub failure is one line naming the model
            raise ModelError(
                f"{label}: cannot download {name_or_path!r} from the hub ({str(err).splitlines()[0]}); "
                "use a local dir or run dir"
            ) from None
    return Path(path)


def _weight_files(path: Path, label: str) -> list[Path]:
    config = _read_json(path / "config.json", label)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ModelError(
            f"{label}: {path} holds {method} weights; merge full-precision models (the source of a "
            "quantize run, not its final/)"
        )
    if (path / WEIGHTS_INDEX).is_file():
        index = _read_json(path / WEIGHTS_INDEX, label)
        return [path / f for f in sorted(set(index["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if f.name != "adapter_model.safetensors" and f.stem.startswith("model")]
    if not files:
        raise ModelError(
            f"{label}: {path} has no model*.safetensors weights (pytorch_model.bin only?); re-save it "
            "with save_pretrained(safe_serialization=True)"
        )
    return files


def _read_json(path: Path, label: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{label}: {path} is missing; point it at a model dir, adapter dir or run dir") from None
    except ValueError as err:
        raise ModelError(f"{label}: {path} is not valid JSON ({err})") from None


def _refuse_unmergeable(config: dict, label: str) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ModelError(
            f"{label} holds a {peft_type} adapter, which adds no weight update to merge; merge LoRA "
            "adapters or full models"
        )
    if config.get("use_dora"):
        raise ModelError(
            f"{label} holds a DoRA adapter (its update is not B @ A x scale); merge the run trained "
            "with peft.merge_on_save=true, or a LoRA run"
        )
    if config.get("lora_bias"):
        raise ModelError(
            f"{label}: adapters with lora_bias=true are not supported; merge a model saved with "
            "peft.merge_on_save=true instead"
        )


def _scale(config: dict, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(alpha_pattern.keys(), module)  # the module name itself when no pattern matches
    alpha = alpha_pattern.get(key, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _expect(name: str, key: str, adapter: LoraAdapter, shape: tuple[int, ...]) -> None:
    if name not in adapter.base.where:
        raise ModelError(
            f"{adapter.label}: adapter tensor {key} targets {name}, which its base "
            f"{adapter.base.path} does not have; the adapter was trained on another model"
        )
    if tuple(shape) != adapter.base.shape(name):
        raise ModelError(
            f"{adapter.label}: adapter tensor {key} gives {name} the shape {tuple(shape)}, its base "
            f"{adapter.base.path} has {adapter.base.shape(name)}; the adapter was trained on another model"
        )


def _slice_dtype(handle, name: str) -> torch.dtype:
    names = {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F64": torch.float64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    dtype = handle.get_slice(name).get_dtype()
    return names.get(dtype, torch.float32)
