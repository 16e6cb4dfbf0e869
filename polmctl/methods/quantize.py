"""Post-training weight quantization, no training: its ``method`` node (the quantize runner,
polmctl/runners/quantize.py, does the work with polmctl/compress/quantize.py).

    polmctl run recipe=quantize                            # nf4: bitsandbytes 4-bit NormalFloat, double quant
    polmctl run recipe=quantize method.scheme=int8         # bitsandbytes LLM.int8()
    polmctl run recipe=quantize method.scheme=cpu_int8     # torchao int8 weights, for inference on CPUs
    polmctl run recipe=quantize method.scheme=cpu_int4     # torchao group-wise int4 weights, CPU
    polmctl run recipe=quantize method.scheme=hqq method.bits=4   # HQQ, no calibration data
    polmctl run recipe=quantize method.scheme=gptq         # GPTQ (GPTQModel), calibrated on the run's data
    polmctl run recipe=quantize method.scheme=awq          # AWQ (GPTQModel), calibrated on the run's data
    polmctl run recipe=quantize model.name_or_path=<LoRA run dir>/final method.adapter=keep \
        method.scheme=cpu_int4 method.group_size=32        # QLoRA-style: int4 base, the adapter kept beside it
"""

from __future__ import annotations

from dataclasses import dataclass

from polmctl.compress.quantize import (
    CALIBRATED_GROUP_SIZES,
    CALIBRATED_SCHEMES,
    COMPUTE_DTYPES,
    IN_PLACE_SCHEMES,
    INT4_GROUP_SIZES,
    SCHEME_BITS,
    SCHEMES,
)
from polmctl.config.schema import one_of, option, positive
from polmctl.errors import ConfigError


@dataclass
class QuantizeMethod:
    name: str = option("quantize", "quantize: post-training weight quantization, no training")
    scheme: str = option(
        "nf4",
        "nf4 | fp4 (bitsandbytes 4-bit) | int8 (bitsandbytes LLM.int8) | cpu_int8 (torchao "
        "int8 weights, for inference on CPUs; pip install 'torchao>=0.15') | cpu_int4 (torchao group-wise "
        "int4 weights, CPU) | hqq (HQQ, method.bits; pip install hqq) | gptq | awq (GPTQModel, calibrated on "
        "method.calibration_rows rows of the run's data; pip install 'polmctl[gptq]')",
    )
    double_quant: bool = option(True, "nf4 / fp4: also quantize the per-block scales (about 0.4 bits per weight less)")
    compute_dtype: str = option(
        "auto",
        "dtype of the activations and of the weights left unquantized (embeddings, "
        "norms), and of nf4 / fp4 matmuls: auto (model.dtype, but bfloat16 for cpu_int4, whose CPU "
        "kernel is slow on float32, and for gptq / awq, whose kernels are 16-bit (float16 on CUDA); "
        "4-bit matmuls in float32 on CPU, bfloat16 or float16 on CUDA) | "
        "float32 | bfloat16 | float16",
    )
    dynamic_activations: bool = option(
        False,
        "cpu_int8: also quantize activations to int8 per token at run time "
        "(torchao Int8DynamicActivationInt8Weight) instead of weights only",
    )
    speed_prompts: int = option(16, "held-out arithmetic prompts generated greedily before and after, for tokens/s")
    speed_max_new_tokens: int = option(32, "tokens/s measurement: new tokens per prompt at most")
    speed_batch_size: int = option(8, "tokens/s measurement: prompts per generate call")
    bits: int = option(4, "bits per weight: hqq 1 | 2 | 3 | 4 | 8, gptq 2 | 3 | 4 | 8, awq 4")
    group_size: int = option(
        64,
        "weights that share one scale and zero point: cpu_int4 32 | 64 | 128, hqq a multiple of 8, gptq / awq "
        "16 | 32 | 64 | 128 | 256 | 512 or -1 (one group per output row)",
    )
    calibration_rows: int = option(
        128, "gptq / awq: rows of the run's data (data.source, data.split) whose activations the quantizer fits to"
    )
    calibration_batch_size: int = option(8, "gptq / awq: rows per calibration forward pass")
    adapter: str = option(
        "merge",
        "when model.name_or_path is an adapter dir: merge (into its base, then quantize the merged model) | keep "
        "(quantize the base alone and keep the adapter unmerged in full precision over it, QLoRA-style: final/ "
        "holds the adapter, final/base/ the quantized base; cpu_int4 and hqq)",
    )

    def check(self, section: str) -> None:
        one_of(section, "scheme", self.scheme, SCHEMES)
        one_of(section, "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.dynamic_activations and self.scheme != "cpu_int8":
            raise ConfigError(
                f"{section}.dynamic_activations",
                f"only cpu_int8 quantizes activations, not {self.scheme}; set method.dynamic_activations=false",
            )
        for name in ("speed_prompts", "speed_max_new_tokens", "speed_batch_size"):
            positive(section, name, getattr(self, name))
        if self.scheme in SCHEME_BITS:
            one_of(section, "bits", self.bits, SCHEME_BITS[self.scheme])
        elif self.bits != 4:
            raise ConfigError(
                f"{section}.bits", f"only {' / '.join(SCHEME_BITS)} read it ({self.scheme} has its own width); drop it"
            )
        if self.scheme == "cpu_int4":
            one_of(section, "group_size", self.group_size, INT4_GROUP_SIZES)
        elif self.scheme == "hqq" and (self.group_size <= 0 or self.group_size % 8):
            raise ConfigError(f"{section}.group_size", f"hqq needs a positive multiple of 8, got {self.group_size}")
        elif self.scheme in CALIBRATED_SCHEMES:
            one_of(section, "group_size", self.group_size, CALIBRATED_GROUP_SIZES)
        elif self.group_size != 64 and self.scheme not in ("cpu_int4", "hqq"):
            raise ConfigError(
                f"{section}.group_size", f"only cpu_int4, hqq, gptq and awq read it, not {self.scheme}; drop it"
            )
        for name in ("calibration_rows", "calibration_batch_size"):
            positive(section, name, getattr(self, name))
        one_of(section, "adapter", self.adapter, ("merge", "keep"))
        if self.adapter == "keep" and self.scheme not in IN_PLACE_SCHEMES:
            raise ConfigError(
                f"{section}.adapter",
                f"keep quantizes the base in polmctl's layout, which cpu_int4 and hqq write, not {self.scheme}; "
                "use method.scheme=cpu_int4 | hqq, or method.adapter=merge",
            )
