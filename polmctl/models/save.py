"""Write a model dir that ``from_pretrained`` loads: weights (safetensors) + tokenizer + chat template."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from polmctl.models.errors import ModelError


def save_model(model, tokenizer, out_dir: Path, *, merge_adapters: bool = False) -> Path:
    """Save into ``out_dir`` atomically (a temp dir, then a rename), replacing what was there.

    A peft model saves its adapter, whose config points at the base model dir, unless
    ``merge_adapters``: then the adapters are merged into a copy of the base weights.
    """
    from peft import PeftModel

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if isinstance(model, PeftModel) and merge_adapters:
        if getattr(model.get_base_model(), "is_quantized", False):
            raise ModelError("peft.merge_on_save with a quantized base is not supported: save the adapter "
                             "(peft.merge_on_save=false) and merge into a full-precision base later")
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
