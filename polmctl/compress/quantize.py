"""Post-training weight quantization (``recipe=quantize``): the quantizing load, and what the
quantize runner measures before and after.

    polmctl run recipe=quantize                            # nf4: bitsandbytes 4-bit NormalFloat, double quant
    polmctl run recipe=quantize method.scheme=int8         # bitsandbytes LLM.int8()
    polmctl run recipe=quantize method.scheme=cpu_int8     # torchao int8 weights, for inference on CPUs
    polmctl run recipe=quantize method.scheme=cpu_int4     # torchao group-wise int4 weights, CPU
    polmctl run recipe=quantize method.scheme=hqq          # HQQ 4-bit (method.bits: 2 | 3 | 4 | 8), CPU or CUDA
    polmctl run recipe=quantize method.scheme=gptq         # GPTQ through GPTQModel, calibrated on the run's data
    polmctl run recipe=quantize method.scheme=awq          # AWQ through GPTQModel, calibrated on the run's data

Schemes:
  nf4 / fp4 / int8   bitsandbytes through transformers' ``BitsAndBytesConfig`` (built by
                     ``polmctl.models.load.quantization_config``); runs on CPU and CUDA.
  cpu_int8           torchao's ``Int8WeightOnlyConfig`` (with ``method.dynamic_activations``:
                     ``Int8DynamicActivationInt8WeightConfig``) through transformers' ``TorchAoConfig``;
                     needs ``pip install 'torchao>=0.15'`` (the ``quant`` extra of polmctl).

  cpu_int4           torchao's ``PrototypeInt4WeightOnlyConfig``: int4 weights in groups of
                     ``method.group_size`` (32 | 64 | 128) with a scale and zero point each, run by torch's
                     CPU int4 matmul (``_weight_int4pack_mm_for_cpu``); the decoder Linear layers only.
  hqq                HQQ (Badri & Shaji, 2023: half-quadratic optimisation of each group's zero point and
                     scale, no calibration data) through the hqq library's ``HQQLinear``, ``method.bits``
                     bits in groups of ``method.group_size``; the decoder Linear layers only. On CPU its
                     forward dequantizes the weight each call: memory falls, speed does not.
  gptq / awq         GPTQ (Frantar et al., 2022: each layer's weights rounded column by column, the rounding
                     error compensated through the inverse Hessian of its calibration inputs) and AWQ (Lin
                     et al., 2023: the input channels that carry large activations scaled up before rounding)
                     through GPTQModel's ``GPTQModel.load`` / ``quantize`` / ``save``, calibrated on
                     ``method.calibration_rows`` rows of the run's data; the decoder Linear layers only.
                     GPTQModel's CPU kernels run GPTQ from 7.6 and AWQ from 7.7 (which needs torch >= 2.14.1).

nf4 / fp4 / int8 / cpu_int8 are written with ``save_pretrained`` (safetensors, the quantization
config in config.json), so ``from_pretrained`` and ``polmctl.models.load_model`` reload the dir
quantized with no extra argument. Embeddings and the LM head stay in full precision (transformers
skips them for both libraries). cpu_int4 and hqq cannot go through ``save_pretrained``: torchao's
safetensors support does not cover the CPU int4 tensor (``Int4OpaqueTensor``: "Unsupported tensor
type"), transformers 5.24's ``HqqConfig`` raises NotImplementedError, and the hqq library's own
save is a pickle (``torch.save``). They are written in polmctl's layout of replaced layers
(polmctl/models/replaced.py: plain safetensors plus a JSON file naming the layers), which
``polmctl.models.load_model`` reloads; transformers alone does not. gptq / awq are written by
GPTQModel's own ``save`` (packed int32 weights, scales and zero points as safetensors, the
quantization_config in config.json), the checkpoint format vLLM, SGLang and transformers read;
``from_pretrained`` reloads it with gptqmodel (and, for GPTQ, optimum) installed. Why GPTQModel and not
llm-compressor: llm-compressor 0.14 pins transformers <= 5.17, older than polmctl's.

Why torchao, not ``torch.ao.quantization.quantize_dynamic``, for cpu_int8 (checked on torch 2.13,
transformers 5.24, torchao 0.18): quantize_dynamic still exists and its fbgemm kernels are fast on
CPU, but it is deprecated (its own warning announces removal; the quantized-tensor constructors it
uses are deprecated too), and the modules it makes hold packed parameters that are not tensors:
its state dict can be neither written as safetensors nor read by ``from_pretrained``, so the only
ways back are pickling the whole module or re-running quantize_dynamic on a fresh model before
``load_state_dict`` -- outside any model dir. torchao's int8 weights are tensor subclasses that
transformers' ``TorchAoHfQuantizer`` flattens into safetensors and rebuilds on load, so the model
dir round-trips. Weight-only is the default: in eager mode on the CPUs tried it generated at about
float32 speed with 4x smaller linear weights, while dynamic activation quantization was slower.

The ``method`` node is polmctl/methods/quantize.py; this module imports no torch at the top.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from polmctl.errors import ConfigError

SCHEMES = ("nf4", "fp4", "int8", "cpu_int8", "cpu_int4", "hqq", "gptq", "awq")
BNB_SCHEMES = ("nf4", "fp4", "int8")
IN_PLACE_SCHEMES = ("cpu_int4", "hqq")  # quantized after loading, saved as replaced layers (models/replaced.py)
CALIBRATED_SCHEMES = ("gptq", "awq")  # GPTQModel: fitted to calibration rows, saved in its checkpoint format
CPU_SCHEMES = ("cpu_int8", "cpu_int4")
SCHEME_BITS = {"hqq": (1, 2, 3, 4, 8), "gptq": (2, 3, 4, 8), "awq": (4,)}  # the schemes that read method.bits
INT4_GROUP_SIZES = (32, 64, 128)  # what torch's CPU int4 kernel takes
CALIBRATED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512)  # GPTQModel's kernels' (-1: one group per row)
HQQ_INSTALL = "pip install hqq (polmctl's quant extra)"
GPTQ_INSTALL = "pip install 'polmctl[gptq]' (GPTQModel and optimum)"
GPTQMODEL_MIN = "7.6"
AWQ_CPU_MIN = "7.7"  # GPTQModel 7.6 quantizes AWQ on CUDA only ("AWQ: CUDA is not available")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
TORCHAO_MIN = "0.15"  # transformers 5.24 treats an older torchao as absent (TORCHAO_MIN_VERSION)
TORCHAO_INSTALL = f"pip install 'torchao>={TORCHAO_MIN}' (polmctl's quant extra)"
# a model dir's weights (not e.g. value_head.safetensors); polmctl_model: replaced layers (models/replaced.py)
WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin", "polmctl_model.safetensors")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def quiet_backends() -> Iterator[None]:
    """Library chatter that says nothing to the user, for the duration: bitsandbytes' int8 cast
    warning (logged at every int8 matmul on CPU), torchao's failed loads of its CUDA-only kernels
    and torch's pytree deprecation lines that a torchao import logs."""
    loggers = [logging.getLogger(n) for n in ("bitsandbytes", "torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # older bitsandbytes
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def check_backend(scheme: str, device) -> None:
    """The scheme's library imports and runs on ``device``, or one ConfigError naming method.scheme."""
    if scheme in BNB_SCHEMES:
        try:
            import bitsandbytes
        except (ImportError, RuntimeError, OSError) as err:  # missing, or its native library does not load
            raise ConfigError(
                "method.scheme",
                f"{scheme} needs a working bitsandbytes ({_first_line(err)}): "
                "pip install -U bitsandbytes, or use method.scheme=cpu_int8",
            ) from None
        supported = getattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
        if device.type not in supported:
            raise ConfigError(
                "method.scheme",
                f"{scheme}: bitsandbytes {bitsandbytes.__version__} does not run on "
                f"{device.type} (it runs on {', '.join(sorted(supported))}); set "
                "trainer.device to one of those, or use method.scheme=cpu_int8",
            )
        return
    if scheme == "hqq":
        if importlib.util.find_spec("hqq") is None:
            raise ConfigError("method.scheme", f"hqq needs the hqq library: {HQQ_INSTALL}, or method.scheme=cpu_int4")
        return
    if scheme in CALIBRATED_SCHEMES:
        _check_gptqmodel(scheme, device)
        return
    if device.type != "cpu":
        raise ConfigError(
            "trainer.device",
            f"method.scheme={scheme} quantizes for CPU inference, got device "
            f"{device}; use trainer.device=cpu, or method.scheme=int8 / nf4 / hqq on GPUs",
        )
    with quiet_backends():
        try:
            import torchao
        except (ImportError, RuntimeError, OSError) as err:
            raise ConfigError(
                "method.scheme",
                f"{scheme} needs torchao ({_first_line(err)}): {TORCHAO_INSTALL}, or use method.scheme=int8",
            ) from None
    from packaging.version import Version

    found = getattr(torchao, "__version__", "unknown")
    try:
        too_old = Version(found) < Version(TORCHAO_MIN)
    except ValueError:  # "unknown" or a local build: let transformers decide
        too_old = False
    if too_old:
        raise ConfigError(
            "method.scheme",
            f"{scheme} needs torchao >= {TORCHAO_MIN}, found {found}: {TORCHAO_INSTALL}, or use method.scheme=int8",
        )
    if scheme == "cpu_int4" and importlib.util.find_spec("torchao.prototype.quantization.int4") is None:
        raise ConfigError(
            "method.scheme",
            f"cpu_int4 needs torchao's CPU int4 (torchao.prototype.quantization.int4, torchao 0.18 has it), "
            f"found torchao {found}: pip install -U torchao, or use method.scheme=hqq",
        )


def _check_gptqmodel(scheme: str, device) -> None:
    """GPTQModel (and, for GPTQ, the optimum that transformers loads GPTQ checkpoints through) is
    installed, new enough, and quantizes ``scheme`` on ``device``."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    needed = ["gptqmodel", "optimum"] if scheme == "gptq" else ["gptqmodel"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            "method.scheme", f"{scheme} needs {' and '.join(missing)}: {GPTQ_INSTALL}, or method.scheme=cpu_int4 | hqq"
        )
    try:
        found = Version(version("gptqmodel"))
    except (PackageNotFoundError, ValueError):  # a source checkout without metadata: let GPTQModel decide
        return
    if found < Version(GPTQMODEL_MIN):
        raise ConfigError(
            "method.scheme", f"{scheme} needs gptqmodel >= {GPTQMODEL_MIN}, found {found}: {GPTQ_INSTALL}"
        )
    if scheme == "awq" and device.type == "cpu" and found < Version(AWQ_CPU_MIN):
        raise ConfigError(
            "method.scheme",
            f"awq on a CPU needs gptqmodel >= {AWQ_CPU_MIN} (found {found}; 7.7 needs torch >= 2.14.1): "
            "upgrade both, run on a CUDA device, or use method.scheme=gptq",
        )


def load_dtype(method, model_dtype: str, device):
    """The torch dtype the model loads in: method.compute_dtype, or model.dtype's resolution for auto
    (cpu_int4: bfloat16)."""
    import torch

    from polmctl.models.load import resolve_dtype

    if method.scheme == "cpu_int4" and method.compute_dtype == "auto":
        # torch's CPU int4 matmul is fast for bfloat16 activations only: decoding a SmolLM2 layer took
        # 0.3-0.6x the dense bf16 Linear's time with them, 11-20x the dense float32 one's with float32
        # activations (benchmarks/int4_cpu_matmul.py; results/2026-12-04-int4-cpu-matmul.txt).
        return torch.bfloat16
    if method.scheme in CALIBRATED_SCHEMES and method.compute_dtype == "auto":
        # AWQ's kernels take float16 / bfloat16 only; GPTQ's CPU kernel generated 6x faster on bfloat16 than on
        # float32 activations (SmolLM2 SFT model: 109 against 18 tokens/s, same exact match), and its CUDA
        # kernels are written for float16.
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return (
        resolve_dtype(model_dtype, device) if method.compute_dtype == "auto" else getattr(torch, method.compute_dtype)
    )


def quantization_config(method, device):
    """The transformers quantization config of ``method.scheme``: BitsAndBytesConfig or TorchAoConfig."""
    import torch

    if method.scheme in BNB_SCHEMES:
        from polmctl.config.schema import ModelConfig
        from polmctl.models.load import quantization_config as bnb_config

        config = bnb_config(ModelConfig(quantization=method.scheme, double_quant=method.double_quant), device)
        if method.scheme != "int8" and method.compute_dtype != "auto":
            config.bnb_4bit_compute_dtype = getattr(torch, method.compute_dtype)
        return config
    with quiet_backends():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        ao = Int8DynamicActivationInt8WeightConfig() if method.dynamic_activations else Int8WeightOnlyConfig()
        return TorchAoConfig(ao)


def quantize_model(
    source: str | Path,
    method,
    *,
    device,
    dtype,
    trust_remote_code: bool = False,
    calibration: list | None = None,
    work_dir: Path | None = None,
):
    """The causal LM in the full-precision model dir ``source``, loaded quantized by ``method``, in eval mode.
    gptq / awq fit to ``calibration`` (token id lists) and return GPTQModel's wrapper of the model, which
    ``save_model`` writes with GPTQModel's own save; GPTQModel's logs go to ``work_dir``/logs (compress/gptq.py)."""
    from transformers import AutoModelForCausalLM

    from polmctl.errors import ModelError

    if method.scheme in CALIBRATED_SCHEMES:
        from polmctl.compress.gptq import quantize_calibrated

        return quantize_calibrated(
            source,
            method,
            calibration or [],
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            work_dir=work_dir,
        )
    if method.scheme in IN_PLACE_SCHEMES:
        return _quantize_in_place(source, method, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    config = quantization_config(method, device)
    try:
        with quiet_backends():
            model = AutoModelForCausalLM.from_pretrained(
                str(source),
                quantization_config=config,
                dtype=dtype,
                device_map={"": device},
                trust_remote_code=trust_remote_code,
            )
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        raise ModelError(f"cannot quantize {source} with method.scheme={method.scheme}: {_first_line(err)}") from None
    model.eval()
    model.requires_grad_(False)
    return model


def _quantize_in_place(source: str | Path, method, *, device, dtype, trust_remote_code: bool):
    """cpu_int4 / hqq: the full-precision model loaded (any dir ``load_model`` reads, a factored one
    too), then its decoder Linear layers quantized: torchao's ``quantize_`` swaps each weight for an
    ``Int4OpaqueTensor``, hqq replaces each layer by an ``HQQLinear``."""
    import torch

    from polmctl.compress.prune import prunable_linears
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model

    model = load_model(
        ModelConfig(
            name_or_path=str(source), dtype=str(dtype).removeprefix("torch."), trust_remote_code=trust_remote_code
        ),
        device=device,
        for_training=False,
    )
    linears = prunable_linears(model)
    if method.scheme == "cpu_int4":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        config = PrototypeInt4WeightOnlyConfig(group_size=method.group_size, set_inductor_config=False)
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in linears)
    else:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=method.bits, group_size=method.group_size, axis=1)
        with torch.no_grad():
            for name, linear in linears.items():
                if hqq_fits(linear.weight.shape, method.bits, method.group_size):  # else it stays as it is
                    model.set_submodule(name, HQQLinear(linear, config, compute_dtype=dtype, device=str(device)))
    model.eval()
    model.requires_grad_(False)
    return model


# hqq packs the rows of a weight viewed as [-1, group_size] this many to a stored row (bitpack.py)
HQQ_ROWS_PACKED = {1: 8, 2: 4, 3: 10, 4: 2, 8: 1}


def hqq_fits(shape, bits: int, group_size: int) -> bool:
    """Whether hqq can quantize a weight of ``shape`` (a low-rank factor with an odd rank may not);
    a layer that does not fit keeps full precision, as torchao leaves one whose width the group
    size does not divide."""
    numel = shape[0] * shape[1]
    return numel % group_size == 0 and (numel // group_size) % HQQ_ROWS_PACKED[bits] == 0


def quantized_layers(model) -> Counter:
    """How many layers hold quantized weights, by kind: bitsandbytes' Linear4bit / Linear8bitLt, or
    ``Linear[<torchao tensor>]`` for a Linear whose weight is a torchao tensor subclass."""
    kinds: Counter = Counter()
    for module in model.modules():
        if hasattr(module, "base_layer"):  # a peft adapter layer: its base_layer is counted on its own
            continue
        name = type(module).__name__
        if name in ("Linear4bit", "Linear8bitLt", "HQQLinear") or _is_gptqmodel_linear(module):
            kinds[name] += 1
        elif _is_tensor_subclass(getattr(module, "weight", None)):
            kinds[f"{name}[{type(module.weight).__name__}]"] += 1
    return kinds


def _is_gptqmodel_linear(module) -> bool:
    """A GPTQModel kernel layer (TorchAtenLinear, TorchCpuAvx512AwqLinear, MarlinLinear, ...): its
    classes derive from ``BaseQuantLinear``, looked up by name so gptqmodel need not be imported."""
    return any(c.__name__ == "BaseQuantLinear" for c in type(module).__mro__[1:])


def full_precision_linears(model) -> list[str]:
    """Names of the nn.Linear layers whose weights were left as plain tensors (e.g. lm_head)."""
    import torch

    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and not _is_tensor_subclass(m.weight)]


def _is_tensor_subclass(t) -> bool:
    """A tensor subclass that stores its data in inner tensors (torchao's Int8Tensor, ...)."""
    return t is not None and hasattr(t, "__tensor_flatten__")


def _stored_tensors(t) -> Iterator[Any]:
    """The plain tensors that hold a parameter's or buffer's data, with what quantization keeps beside it.

    ``numel() * element_size()`` (what ``get_memory_footprint`` sums) is right for plain
    tensors but not for quantized ones: a torchao tensor reports its logical dtype (float32)
    while it stores int8 data plus scales in inner tensors, and bitsandbytes keeps each weight's
    scales in a ``quant_state`` (4-bit: absmax, codebook, nested state) or ``SCB`` (int8: one
    scale per output row) attribute that is neither parameter nor buffer.
    """
    import torch

    if _is_tensor_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name, None)
            if inner is not None:
                yield from _stored_tensors(inner)
        return
    yield t
    state = getattr(t, "quant_state", None)
    if state is not None:
        yield from (v for v in state.as_dict(packed=False).values() if torch.is_tensor(v))
    scb = getattr(t, "SCB", None)
    if torch.is_tensor(scb):
        yield scb


def parameter_bytes(model) -> int:
    """Bytes of the model's parameters and buffers in memory, quantization state included, each
    stored tensor once (tied weights, shared codebooks); equal to ``model.get_memory_footprint()``
    for an unquantized model."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():  # bitsandbytes int8 moves a weight's SCB into module.state at its first matmul
        state = getattr(module, "state", None)
        if type(state).__name__ == "MatmulLtState":
            tensors += [v for v in vars(state).values() if torch.is_tensor(v)]
        if type(module).__name__ == "HQQLinear":  # its scales and zero points live in a dict, not as buffers
            tensors += [v for v in module.meta.values() if torch.is_tensor(v)]
    seen: set[tuple] = set()
    total = 0
    for t in tensors:
        for stored in _stored_tensors(t):
            key = (stored.data_ptr(), stored.numel(), stored.dtype)
            if key not in seen:
                seen.add(key)
                total += stored.numel() * stored.element_size()
    return total


def weight_files(model_dir: str | Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_FILES for p in Path(model_dir).glob(pattern)})


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes on disk of a model dir's weights files (model*.safetensors, pytorch_model*.bin)."""
    return sum(p.stat().st_size for p in weight_files(model_dir))


def saved_bytes(model_dir: str | Path) -> int:
    """Bytes on disk of what a model dir needs: its weights files, an adapter's weights, and the quantized
    base a kept adapter sits on (``base/``, method.adapter=keep)."""
    model_dir = Path(model_dir)
    total = weights_bytes(model_dir) + sum(p.stat().st_size for p in model_dir.glob("adapter_model*.safetensors"))
    return total + (saved_bytes(model_dir / "base") if (model_dir / "base").is_dir() else 0)


def is_full_model_dir(path: str | Path) -> bool:
    """A local dir holding a whole model's weights (not a peft adapter, not a hub id)."""
    path = Path(path)
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and not (path / "adapter_config.json").exists()
        and bool(weight_files(path))
    )


def describe_quantization(config: Any) -> str | None:
    """``bitsandbytes nf4``, ``torchao Int8WeightOnlyConfig``, ... for a quantization_config
    (dict or transformers object); None for none."""
    if config is None:
        return None
    qc = config if isinstance(config, dict) else config.to_dict()
    method = qc.get("quant_method", "unknown")
    method = str(getattr(method, "value", method))  # a QuantizationMethod enum in the object's to_dict
    if qc.get("load_in_4bit"):
        return f"{method} {qc.get('bnb_4bit_quant_type', '4-bit')}"
    if qc.get("load_in_8bit"):
        return f"{method} int8"
    quant_type = qc.get("quant_type")
    if isinstance(quant_type, dict):
        inner = quant_type.get("default", quant_type)
        return f"{method} {inner.get('_type', '')}".strip() if isinstance(inner, dict) else method
    return method


def dir_quantization(path: str | Path) -> str | None:
    """The quantization a local model dir was saved with (from its config.json, or the layers file of
    polmctl's replaced-layer layout), or None."""
    from polmctl.models.replaced import LAYERS_FILE

    layers = Path(path) / LAYERS_FILE
    if layers.is_file():
        try:
            kinds = {spec["kind"] for spec in json.loads(layers.read_text())["layers"].values()}
        except (ValueError, KeyError, TypeError):  # a malformed file is reported by the loader
            return None
        described = [{"hqq": "hqq", "torchao": "torchao int4"}[k] for k in sorted(kinds) if k != "lowrank"]
        return ", ".join(described) or None
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return describe_quantization(json.loads(config.read_text()).get("quantization_config"))
    except ValueError:  # a malformed config.json is reported by the loader
        return None


def model_quantization(model) -> str | None:
    """The quantization a loaded model carries (its config's quantization_config), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    described = describe_quantization(getattr(base.config, "quantization_config", None))
    if described is None and quantized_layers(base):
        return ", ".join(quantized_layers(base))
    return described


def speed_prompts(tokenizer, n: int) -> list[str]:
    """The first ``n`` held-out prompts of builtin:arithmetic's test split, rendered for the model."""
    from polmctl.data import format_prompt, load_rows
    from polmctl.data.prompts import prompt_of

    return [format_prompt(prompt_of(r), tokenizer) for r in load_rows("builtin:arithmetic", "test", max_rows=n)]


def generation_speed(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Greedy generation of ``prompts``: new tokens (each row up to its end-of-sequence token),
    seconds, tokens/s, and the completions' token ids (to compare before and after)."""
    import torch

    from polmctl.rollout import generate

    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Warm-up: one-time costs (kernel selection, allocator growth) stay out of the timing.
    generate(model, tokenizer, prompts[:1], max_new_tokens=2, batch_size=1, decode=False)
    sync()
    started = time.perf_counter()
    completions = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, decode=False
    )
    sync()
    seconds = time.perf_counter() - started
    tokens = sum(len(c) for c in completions)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "completions": completions,
    }


def ratio(after: float | None, before: float | None) -> float | None:
    return after / before if after is not None and before else None
