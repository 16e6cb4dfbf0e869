"""What a launcher config asks for, and what polmctl does not combine with it: one-line config
errors before any process starts.

    polmctl run recipe=lora launcher=accelerate launcher.config_file=fsdp launcher.num_processes=2
    polmctl run recipe=sft launcher=accelerate launcher.config_file=deepspeed_zero3 launcher.num_processes=2

The accelerate config file is read the way ``accelerate launch --config_file`` reads it. The ranks
check the same again (engine/sharding.py, engine/trainer.py), for runs started by hand.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from polmctl.config.schema import RunConfig
from polmctl.errors import ConfigError


def config_file_strategy(path: Path) -> str:
    """single | ddp | fsdp2 | deepspeed_zero2 | deepspeed_zero3 (or a ConfigError for what polmctl does not run)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    kind = config.distributed_type.value if hasattr(config.distributed_type, "value") else str(config.distributed_type)
    if kind == "FSDP":
        version = int((config.fsdp_config or {}).get("fsdp_version", 1))
        if version != 2:
            raise ConfigError(
                "launcher.config_file", f"{path} asks for FSDP{version}; polmctl runs FSDP2: set fsdp_version: 2"
            )
        return "fsdp2"
    if kind == "DEEPSPEED":
        stage = int((config.deepspeed_config or {}).get("zero_stage", 2))
        if stage not in (2, 3):
            raise ConfigError("launcher.config_file", f"{path} asks for ZeRO stage {stage}; polmctl runs stage 2 or 3")
        return f"deepspeed_zero{stage}"
    if kind in ("MULTI_GPU", "MULTI_CPU"):
        return "ddp"
    if kind == "NO":
        return "single"
    raise ConfigError(
        "launcher.config_file", f"{path}: distributed_type {kind} is not run by polmctl (see docs/distributed.md)"
    )


def check_strategy(run: RunConfig, strategy: str, processes: int | None) -> None:
    """Raise a ConfigError naming the key for what cannot run under ``strategy`` with ``processes``."""
    sharded = strategy in ("fsdp2", "deepspeed_zero3")
    several = (processes or 1) > 1 or sharded
    if run.trainer.auto_batch and several:
        raise ConfigError(
            "trainer.auto_batch",
            "works in one process only (one rank retrying a step would hang the others); set it to false and "
            "lower trainer.micro_batch_size instead",
        )
    if sharded and processes == 1:
        raise ConfigError("launcher.num_processes", f"{strategy} with one process shards nothing; start 2 or more")
    if sharded:
        _check_sharded(run, strategy)
    if strategy.startswith("deepspeed"):
        _check_deepspeed(run, strategy)


def _check_sharded(run: RunConfig, strategy: str) -> None:
    if run.model.quantization != "none":
        # FSDP2 gathers a layer's weights in one buffer of one dtype: bnb's 4-bit weights would need their
        # storage dtype (bnb_4bit_quant_storage) set to the compute dtype at load, which polmctl's loader
        # does not do, and bnb has no CPU path under FSDP; ZeRO-3 partitions float weights only.
        raise ConfigError(
            "model.quantization",
            f"{run.model.quantization}: bitsandbytes-quantized weights are not sharded by polmctl under "
            f"{strategy}; use model.quantization=none (LoRA) or launcher.config_file=ddp",
        )
    if run.peft.method in ("prompt_tuning", "prefix_tuning", "adalora"):
        why = (
            "changes the adapters' ranks after every step on whole weights"
            if run.peft.method == "adalora"
            else "decodes without a KV cache, a different number of forward passes on each rank"
        )
        raise ConfigError("peft.method", f"{run.peft.method} is not run under {strategy}: it {why}; use lora")
    if run.trainer.keep_sparsity:
        raise ConfigError(
            "trainer.keep_sparsity", f"re-applies masks to whole weights after every step; not under {strategy}"
        )
    if run.trainer.optimizer == "adamw_8bit":
        raise ConfigError("trainer.optimizer", f"adamw_8bit is not run on sharded weights ({strategy}); use adamw")


def _check_deepspeed(run: RunConfig, strategy: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("launcher.config_file", f"{strategy} needs DeepSpeed: pip install 'polmctl[deepspeed]'")
    if run.trainer.grad_accum > 1:
        raise ConfigError(
            "trainer.grad_accum",
            "DeepSpeed steps the optimizer after every backward pass here; set trainer.grad_accum=1 and raise "
            "trainer.micro_batch_size instead",
        )
    if run.trainer.save_every:
        raise ConfigError(
            "trainer.save_every",
            "DeepSpeed's own checkpoints are pickles (polmctl never unpickles a checkpoint); set "
            "trainer.save_every=0 (final/ is still written, gathered on rank 0)",
        )
