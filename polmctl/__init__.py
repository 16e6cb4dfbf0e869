"""polmctl: post-train language models from the command line (polmctl/cli.py)."""

import logging

# transformers imports torchao, whose enums register with torch's pytree, and torch 2.13 logs a
# deprecation warning for each ("... is an Enum subclass and is now natively supported by
# torch.compile"), before any command's output. Nothing a polmctl user can act on: dropped at that
# logger, before any polmctl module imports torch. Other _pytree warnings still show.
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage()
)
