"""Which dtype a model computes in, and float32 for everything that trains.

    polmctl run recipe=lora model.dtype=bfloat16     # bf16 weights and compute, float32 adapters
    polmctl run recipe=lora model.dtype=auto         # bf16 where the hardware computes it fast

``model.dtype=auto`` is bfloat16 on CUDA GPUs of compute capability 8.0 or more (bf16 tensor
cores) and on CPUs with AVX512-BF16 or AMX-BF16 (bf16 dot products in hardware, run by
oneDNN), float32 anywhere else. The default, ``auto_gpu``, decides the same on GPUs and keeps
every CPU in float32: bf16's held-out scores on the CPU recipes are not measured yet, and a
test suite whose numbers hang on the CPU's flags would not be one suite (docs/performance.md).
The run's log says which and why, once.

Whatever the weights' dtype, every parameter that trains is float32, and so is the optimizer
state that follows it: peft already keeps its adapters in float32 (``autocast_adapter_dtype``);
``float32_trainables`` does the same for what peft does not cover (a reward or PRM score head
copied by ``modules_to_save``, LN tuning's norms, every weight of a full fine-tune) and then runs
the model's forward under ``torch.autocast`` in the weights' dtype, so float32 weights meet bf16
activations in bf16 matmuls, as accelerate's and LLaMA-Factory's mixed precision do.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import MethodType

import torch

from polmctl.config.schema import MODEL_DTYPES
from polmctl.console import console
from polmctl.errors import CommandError

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_bf16_features() -> list[str]:
    """The CPU's bf16 instruction sets among AVX512-BF16 and AMX-BF16 (empty: none, or unknown)."""
    wanted = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
    try:
        caps = torch.cpu.get_capabilities()  # torch >= 2.6: cpuinfo's flags, on every OS
    except (AttributeError, RuntimeError):
        caps = None
    if caps is None:
        cpuinfo = Path("/proc/cpuinfo")
        flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
        caps = {name: name in flags for name in wanted}
    return [label for name, label in wanted.items() if caps.get(name)]


AUTO_DTYPES = ("auto_gpu", "auto")


def check_dtype_flag(name: str) -> None:
    """A command's --dtype takes model.dtype's choices; anything else is a CommandError before a model loads."""
    if name not in MODEL_DTYPES:
        raise CommandError(f"--dtype {name}: choose one of {', '.join(MODEL_DTYPES)}")


def choose_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """``model.dtype`` -> (torch dtype, why). ``auto`` decides by the hardware of ``device``;
    ``auto_gpu`` (the default) too on GPUs, and keeps float32 on CPUs."""
    if name not in AUTO_DTYPES:
        return getattr(torch, name), f"model.dtype={name}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return torch.float32, "no CUDA device here"
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"CUDA compute capability {major}.{minor} >= 8.0 has bf16 tensor cores"
        return torch.float32, f"CUDA compute capability {major}.{minor} < 8.0 has no fast bf16"
    if device.type == "cpu":
        features = cpu_bf16_features() if torch.backends.mkldnn.is_available() else []
        if not features:
            return torch.float32, "this CPU has neither AVX512-BF16 nor AMX-BF16"
        if name == "auto":
            return torch.bfloat16, f"this CPU has {' and '.join(features)} (bf16 matmuls in hardware)"
        return torch.float32, (
            f"the default keeps CPUs in float32; this one has {' and '.join(features)}, "
            "so model.dtype=auto would train in bf16 (docs/performance.md)"
        )
    return torch.float32, f"no fast-bf16 check for {device.type} devices"


@functools.lru_cache(maxsize=None)
def say_dtype_choice(name: str, dtype: torch.dtype, why: str) -> None:
    """The run's one log line about ``model.dtype=auto|auto_gpu`` (once per process and decision)."""
    console.print(f"[bold]dtype[/] model.dtype={name} -> {str(dtype).removeprefix('torch.')}: {why}", highlight=False)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def float32_trainables(model: torch.nn.Module) -> int:
    """Make every trainable bf16/fp16 parameter float32; returns how many were cast.

    When any was, the base model's forward (the one every caller reaches: a peft wrapper, DDP,
    ``generate``) runs under ``torch.autocast`` in the dtype those parameters had, so the
    float32 ones compute in bf16 next to the frozen bf16 weights (accelerate's own way of
    adding autocast to a model's forward). Peft's adapter parameters are float32 already."""
    cast, compute, device_type = 0, None, None
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and param.dtype in LOW_PRECISION:
                compute, device_type = param.dtype, param.device.type
                param.data = param.data.float()  # the same Parameter: references to it stay valid
                cast += 1
    if cast and device_type != "meta":  # a meta model (polmctl plan) only counts bytes
        base = _base(model)
        forward = getattr(base.forward, "__func__", type(base).forward)
        # MethodType (not a closure) so that copy.deepcopy (a frozen reference) binds the copy.
        base.forward = MethodType(torch.autocast(device_type=device_type, dtype=compute)(forward), base)
    return cast


def _compact_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _contiguous_input(module, args):
    # is_contiguous() is True for a [B, 1, H] slice of [B, T, H] (its size-1 dim's stride is
    # ignored), but matmul's folding reads the strides: compare them with the compact ones.
    if not args or args[0].stride() == _compact_strides(args[0].shape):
        return None
    return (args[0].clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


def contiguous_head_input(model: torch.nn.Module) -> bool:
    """Hand the LM head contiguous hidden states. transformers slices the last position for
    ``logits_to_keep=1`` (every prefill of generation, shared-prompt prefills): a [B, 1, H]
    view of [B, T, H], which ``matmul`` runs as a batched matmul against the [V, H] head
    expanded B times; in bf16 on CPU that expansion is copied, 0.58 s per call on SmolLM2 for
    B = 4 against 8 ms for the same product on a contiguous copy of the [B, 1, H] slice."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return False
    head.register_forward_pre_hook(_contiguous_input)
    return True


def no_cudnn_attention() -> bool:
    """Keep PyTorch's scaled-dot-product attention off its cuDNN backend (process-wide; flash or
    memory-efficient attention run instead). cuDNN's attention builds an execution graph for each
    new sequence length, and packed rows, DPO's pairs and generation change the length every step
    or token: profiled on an H200 (2026-12-04, random 1.07B Llama, recipe=lora in bf16, 8 steps),
    the cuDNN forward and backward calls took 2.5-3 ms of host time each, 7.5 s of the run's 12.5 s
    of CPU time, against 0.5 s of GPU time in all, and bf16 steps took 2.5-4x float32's (which cuDNN
    attention does not run, docs/distributed.md). Returns whether it was on."""
    was_on = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    return was_on


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's frozen weights (and so its activations) are in: the most common
    floating dtype among its parameters."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32
