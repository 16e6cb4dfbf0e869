"""polmctl: post-train language models from the command line (polmctl/cli.py)."""

import logging
import os

# transformers >= 5.2x kernelizes every model it loads with compute kernels downloaded from the Hugging Face
# hub (the `kernels` package, a dependency of transformers) unless USE_HUB_KERNELS says no. That is code
# from a hub repo run on load, and on an offline GPU machine every load fails ("Version 2 of
# 'kernels-community/rotary' is not available in the local cache"; seen on an H200, 2026-12-04). polmctl
# runs no downloaded code by default: USE_HUB_KERNELS=YES in your environment turns them back on.
os.environ.setdefault("USE_HUB_KERNELS", "NO")

# transformers imports torchao, whose enums register with torch's pytree, and torch 2.13 logs a
# deprecation warning for each ("... is an Enum subclass and is now natively supported by
# torch.compile"), before any command's output. Nothing a polmctl user can act on: dropped at that
# logger, before any polmctl module imports torch. Other _pytree warnings still show.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage()
)

# Two more lines every command printed first on some CPUs, about optional native kernels polmctl does not use:
# torchao's CUDA-only extension files (its CPU paths work without them), and bitsandbytes' faster CPU 4-bit
# kernel, which it would fetch from the model hub (unreachable here; the plain CPU kernel is used instead).
logging.getLogger("torchao").addFilter(lambda record: not record.getMessage().startswith("Failed to load "))
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)
