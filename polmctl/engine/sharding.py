"""Which distribution strategy a run asked for, which one it runs, and FSDP2 on CPU.

    polmctl run recipe=sft launcher=accelerate launcher.num_processes=2 launcher.config_file=fsdp
    polmctl run recipe=lora launcher=accelerate launcher.config_file=deepspeed_zero3 launcher.num_processes=2

``accelerate launch --config_file`` tells each worker what was asked through its environment
(ACCELERATE_USE_FSDP, FSDP_*, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE); the
engine reads the same variables, checks after preparing the model that this is what it got, and
stops if not: a requested strategy that cannot run is an error, never a quiet substitute.
The run's log and summary.json record what ran (``Strategy.record``).

FSDP2 on CPU. accelerate 1.16 applies FSDP only on top of a multi-GPU (or NPU, XPU, ...) state:
with several CPU processes it comes up as MULTI_CPU and ``prepare`` wraps the model in DDP,
dropping the FSDP plugin. Its own workaround is to overwrite ``distributed_type`` in accelerate's
private shared state. polmctl instead applies torch's public ``fully_shard`` itself (each
decoder layer, then the root), with the options of accelerate's own FSDP plugin (which parses the
launcher's FSDP_* variables), and keeps accelerate for the process group, autocast and the
reductions. On CUDA, accelerate's FSDP2 plugin applies it as usual (``Accelerator.prepare``).
Either way the model ends up an ``FSDPModule`` and everything after (checkpoints, the gathered
final/, generation) goes through torch's APIs.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from polmctl.errors import TrainingError

STRATEGIES = ("single", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
SHARDED = ("fsdp2", "deepspeed_zero3")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_strategy() -> str:
    """What the launcher asked for, from the variables ``accelerate launch`` sets for each worker."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise TrainingError(
                f"launcher.config_file: fsdp_version {version} was requested; polmctl runs FSDP2 only (set "
                "fsdp_version: 2 in the accelerate config, as polmctl/conf/accelerate/fsdp.yaml does)"
            )
        return "fsdp2"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            raise TrainingError(f"launcher.config_file: DeepSpeed ZeRO stage {stage}; polmctl runs stage 2 or 3")
        return f"deepspeed_zero{stage}"
    return "ddp" if world > 1 else "single"


@dataclass
class Strategy:
    """The strategy a run asked for and the one it runs; ``record`` goes into summary.json."""

    requested: str
    processes: int
    backend: str | None
    device: str
    name: str | None = None  # what ran, once the model is prepared
    applied_by: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """Weights sharded over ranks: evaluation and final/ gather them, checkpoints are sharded."""
        return self.requested in SHARDED

    @property
    def deepspeed(self) -> bool:
        return self.requested.startswith("deepspeed")

    def confirm(self, model: torch.nn.Module) -> None:
        """After preparing: the model is what was requested, or the run stops here."""
        self.name = strategy_of(model)
        if self.name != self.requested:
            raise TrainingError(
                f"launcher.config_file: {self.requested} was requested but the model was prepared as "
                f"{self.name} ({self.processes} processes, {self.backend or 'no'} backend, {self.device}); "
                "polmctl does not run a substitute. See docs/distributed.md for what runs where"
            )

    def record(self) -> dict[str, Any]:
        return {
            "strategy": self.name or self.requested,
            "processes": self.processes,
            "backend": self.backend,
            "device": self.device,
            "applied_by": self.applied_by,
            "checkpoints": "sharded (torch.distributed.checkpoint)"
            if self.requested == "fsdp2"
            else ("deepspeed (final/ only)" if self.deepspeed else "full (rank 0)"),
            **self.details,
        }

    def line(self) -> str:
        """One line for the run's log."""
        what = self.name or self.requested
        extra = f", {self.applied_by}" if self.applied_by else ""
        wrapped = self.details.get("wrapped")
        if wrapped:
            extra += f"; fully_shard on each {', '.join(wrapped)}, then the root"
        backend = self.backend or "none"
        return f"distributed: {what}, {self.processes} process(es), backend {backend} on {self.device}{extra}"


def strategy_of(model: torch.nn.Module) -> str:
    """What ``model`` was prepared as: fsdp2 | deepspeed_zero2/3 | ddp | single."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, FSDPModule):
        return "fsdp2"
    if type(model).__name__ == "DeepSpeedEngine":
        return f"deepspeed_zero{model.zero_optimization_stage()}"
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    return "single"


# -- FSDP2 ---------------------------------------------------------------------------------------


def fsdp_plugin():
    """accelerate's FSDP plugin, built from the FSDP_* variables the launcher set (its config file)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def layer_classes(model: torch.nn.Module) -> set[str]:
    """The transformer-layer classes FSDP wraps one by one: the plugin's list, else the model's
    ``_no_split_modules`` (a peft model's base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or [])


def check_fsdp_on_cpu(plugin, model: torch.nn.Module, mixed_precision: str) -> None:
    """What polmctl's own fully_shard on CPU does not do, said before anything is sharded."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise TrainingError(
            "launcher.config_file: fsdp_offload_params=true offloads to the CPU from an accelerator; the "
            "weights are already on the CPU here: set fsdp_offload_params: false"
        )
    if plugin.activation_checkpointing:
        raise TrainingError(
            "launcher.config_file: fsdp_activation_checkpointing on CPU is not applied by polmctl; set it to "
            "false and use model.gradient_checkpointing=true instead"
        )
    if mixed_precision == "fp16":
        raise TrainingError("trainer.mixed_precision: fp16 under FSDP on CPU is not supported; use bf16 or no")
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise TrainingError(
            "model.quantization: bitsandbytes 4-bit weights cannot be sharded by FSDP on CPU; use "
            "model.quantization=none (LoRA), or FSDP on GPUs"
        )


def shard_fsdp2(model: torch.nn.Module, plugin, mixed_precision: str) -> list[str]:
    """torch's ``fully_shard`` on each transformer layer, then on the root (in place); returns the
    wrapped class names. The root keeps its weights gathered after forward (torch's default for the
    root), so modules beside the model that a method calls directly (PPO's value head) see them."""
    from torch.distributed.fsdp import fully_shard

    classes = set(plugin.transformer_cls_names_to_wrap or []) or layer_classes(model)
    if not classes:
        raise TrainingError(
            f"launcher.config_file: FSDP wraps transformer layers, but {type(model).__name__} names none "
            "(no _no_split_modules); set fsdp_transformer_layer_cls_to_wrap in the accelerate config"
        )
    policy = mixed_precision_policy(model, mixed_precision)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    names = sorted({type(m).__name__ for m in layers})  # before fully_shard renames the classes (FSDP<name>)
    if not layers:
        raise TrainingError(f"launcher.config_file: no module of the classes to wrap ({sorted(classes)}) in the model")
    for layer in layers:
        _check_one_dtype(layer, policy)
        fully_shard(layer, reshard_after_forward=plugin.reshard_after_forward, mp_policy=policy)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if inner is not model:
        # A peft model's generate() calls the inner transformers model, past the wrapper's hooks: the
        # embedding and LM head need a unit of their own to be gathered for it.
        _check_one_dtype(inner, policy)
        fully_shard(inner, mp_policy=policy)
    _check_one_dtype(model, policy)
    fully_shard(model, mp_policy=policy)
    return names


def mixed_precision_policy(model: torch.nn.Module, mixed_precision: str):
    """FSDP2's gather dtype. trainer.mixed_precision=bf16: gathered and computed in bf16, gradients
    reduced in float32. A model whose weights load in bf16 (model.dtype) keeps float32 trainable
    parameters (adapters, heads) beside them: gathered in the weights' dtype, as the unsharded run
    computes in it (models/precision.py), with float32 gradient reduction and optimizer state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    low = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if mixed_precision == "no" and len(low) == 1:
        return MixedPrecisionPolicy(param_dtype=low.pop(), reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def check_plugin_dtypes(model: torch.nn.Module, mixed_precision: str) -> None:
    """accelerate's FSDP2 plugin (GPUs) gathers in the weights' own dtypes unless
    trainer.mixed_precision asks for bf16; bf16 weights beside float32 adapters then cannot be
    gathered together: said here, before anything is sharded."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1 and mixed_precision == "no":
        raise TrainingError(
            f"trainer.mixed_precision: FSDP gathers each layer's weights together, and the model holds "
            f"{sorted(str(d) for d in dtypes)} (model.dtype weights with float32 adapters or heads); set "
            "trainer.mixed_precision=bf16 (weights gathered in bf16 for compute) or model.dtype=float32"
        )


def initialise_root(model: torch.nn.Module, device: torch.device) -> None:
    """One forward through the outermost module on every rank, so FSDP takes it as the root. FSDP
    makes whichever unit runs first the root, and a rollout's generate() runs the inner model first."""
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))


def _check_one_dtype(module: torch.nn.Module, policy) -> None:
    """FSDP2 gathers a unit's weights in one buffer: one dtype per unit, unless cast for compute."""
    from torch.distributed.fsdp import FSDPModule

    dtypes = {
        p.dtype for n, p in module.named_parameters() if not _in_unit(module, n, FSDPModule) and p.is_floating_point()
    }
    if len(dtypes) > 1 and policy.param_dtype is None:
        raise TrainingError(
            f"model.dtype: FSDP gathers each layer's weights together, and {type(module).__name__} holds "
            f"{sorted(str(d) for d in dtypes)} (e.g. bfloat16 weights with float32 adapters); set "
            "trainer.mixed_precision=bf16 (weights gathered in bf16 for compute) or model.dtype=float32"
        )


def _in_unit(root: torch.nn.Module, name: str, unit_type) -> bool:
    """Whether parameter ``name`` of ``root`` sits in a sub-module that is already an FSDP unit."""
    parts = name.split(".")[:-1]
    module = root
    for part in parts:
        module = getattr(module, part)
        if isinstance(module, unit_type):
            return True
    return False


class FSDPMicroBatch:
    """Keeps an FSDP2 model's gathered weights through a micro-batch's backward when a layer ran
    more than once in its forward, and frees them after.

    The shared-prompt forward (DPO family, GRPO: models/shared_prompt.py) runs the prompt through
    the model into a KV cache and the answers on top of it, with gradients; the keys and values
    reach the second pass through the cache object, past the hooks FSDP puts on a layer's outputs.
    FSDP would then free a layer after the second pass's backward, before the first pass's backward
    needs it ("storage of size 0"). So in that case resharding after backward is off for the
    micro-batch and every unit is resharded explicitly once its backward is done. One forward per
    layer (SFT, KTO, reward models, ...) keeps FSDP's own layer-by-layer freeing."""

    def __init__(self, model: torch.nn.Module):
        from torch.distributed.fsdp import FSDPModule

        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.calls: dict[int, int] = {}
        self.kept = False
        for unit in self.units:
            unit.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if torch.is_grad_enabled():
            self.calls[id(module)] = self.calls.get(id(module), 0) + 1

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        self.calls.clear()
        yield

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        self.kept = max(self.calls.values(), default=0) > 1
        if self.kept:
            for unit in self.units:
                unit.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            if self.kept:
                for unit in self.units:
                    unit.reshard()
                    unit.set_reshard_after_backward(True, recurse=False)


# -- the whole model on rank 0 -------------------------------------------------------------------


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (its modules, peft config, attached heads) whose parameters are on the
    meta device: no memory. Made before sharding; the gathered weights fill it on rank 0."""
    memo = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def gather_full_model(model: torch.nn.Module, skeleton: torch.nn.Module, is_main: bool) -> torch.nn.Module | None:
    """The trained weights of a sharded ``model`` in ``skeleton``, on rank 0 (None on the others).
    A collective: every rank calls it. FSDP2: torch's full state dict (gathered, on CPU, rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    return fill_skeleton(skeleton, full)


def fill_skeleton(skeleton: torch.nn.Module, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``skeleton`` with ``full`` (every parameter and persistent buffer by name) as its weights."""
    missing, unexpected = skeleton.load_state_dict(full, strict=False, assign=True)
    if getattr(getattr(skeleton, "config", None), "tie_word_embeddings", False) and hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()  # assign=True gave the embedding and the LM head separate tensors
    meta = [n for n, p in skeleton.named_parameters() if p.device.type == "meta"]
    if meta or unexpected:
        raise TrainingError(
            f"the gathered weights do not fill the model: missing {meta[:3] or missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return skeleton
