"""Write a model dir that ``from_pretrained`` loads: weights (safetensors) + tokenizer + chat template.

A peft model is written as its adapter (adapter_model.safetensors + adapter_config.json,
whose base_model_name_or_path names the base model dir or hub id), or with
``merge_adapters`` as one full model with the adapter's update merged into the weights (every
peft method but prompt and prefix tuning merges). A PiSSA/OLoRA adapter is written as the plain
LoRA that turns the original base into the trained model (models/peft_variants.py).
A model whose Linear layers polmctl replaced (low-rank factors, HQQ or torchao int4 weights) is
written in polmctl's own layout (models/replaced.py), which ``load_model`` reads. A model GPTQModel
quantized (GPTQ / AWQ, compress/gptq.py) is written by GPTQModel's own save.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
from pathlib import Path
from typing import Iterator

from polmctl.errors import ModelError
from polmctl.models.peft_variants import initial_adapter, save_converted
from polmctl.models.replaced import replaced_layers, save_replaced


def _write(model, tokenizer, tmp: Path, merge_adapters: bool, heads: dict, sparsity) -> None:
    from safetensors.torch import save_file

    for name in heads:  # out of the model's own weights while it is written
        delattr(model, name)
    try:
        _write_model(model, tokenizer, tmp, merge_adapters, sparsity)
    finally:
        for name, head in heads.items():
            model.add_module(name, head)
    for name, head in heads.items():
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp / f"{name}.safetensors")
        )


def _is_gptqmodel_wrapper(model) -> bool:
    """GPTQModel's ``BaseQModel`` (what recipe=quantize method.scheme=gptq | awq makes, compress/gptq.py),
    by class name: gptqmodel is an optional package, imported only where a scheme uses it."""
    return any(c.__name__ == "BaseQModel" for c in type(model).__mro__)


def _write_model(model, tokenizer, tmp: Path, merge_adapters: bool, sparsity) -> None:
    from peft import PeftModel

    to_save = model
    if isinstance(model, PeftModel):
        if merge_adapters:
            config = model.active_peft_config
            if config.is_prompt_learning:
                raise ModelError(
                    f"cannot merge a {config.peft_type} adapter into the weights (its virtual tokens are "
                    "not a weight update); save without merging (peft.merge_on_save=false)"
                )
            if getattr(model.get_base_model(), "is_quantized", False):
                raise ModelError(
                    "merging adapters into a quantized base is not supported (it would need a "
                    "de-quantized copy of the base): save the adapter (peft.merge_on_save=false) and "
                    "merge it into a full-precision base later"
                )
            # A copy: the caller keeps training or evaluating the unmerged model.
            to_save = copy.deepcopy(model).merge_and_unload()
            if sparsity is not None:  # the merged LoRA update is dense
                sparsity.apply(to_save)
    elif merge_adapters and getattr(model, "peft_config", None):
        raise ModelError("merge_adapters needs a peft.PeftModel; this model has adapters injected another way")
    if _is_gptqmodel_wrapper(to_save):
        with contextlib.redirect_stdout(io.StringIO()):  # GPTQModel prints a line per step of its save
            to_save.save(str(tmp))  # packed weights, the quantization_config in config.json
    elif not isinstance(to_save, PeftModel) and replaced_layers(to_save):  # low-rank / HQQ / torchao int4 layers
        save_replaced(to_save, tmp)
    elif to_save is model and initial_adapter(model) is not None:
        save_converted(model, tmp)
    else:
        to_save.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def save_model(
    model, tokenizer, out_dir: str | Path, *, merge_adapters: bool = False, heads: dict | None = None, sparsity=None
) -> Path:
    """Save ``model`` and ``tokenizer`` into ``out_dir``, atomically, replacing what was there.

    ``heads``, modules attached to the model only for training (PPO's value head), are left
    out of the model's weights and written beside them as ``<name>.safetensors``.
    ``sparsity`` (polmctl.compress.SparsityMasks) re-zeroes a pruned model's masked weights
    after adapters are merged into them.

    Everything is written into ``<out_dir>.tmp-<pid>`` first and renamed into place only
    when complete; if writing fails, an existing ``out_dir`` is left untouched.
    """
    with _replacing(out_dir) as tmp:
        _write(model, tokenizer, tmp, merge_adapters, heads or {}, sparsity)
    return Path(out_dir)


@contextlib.contextmanager
def _replacing(out_dir: str | Path) -> Iterator[Path]:
    """A temporary dir beside ``out_dir`` to write into; renamed to ``out_dir`` when the block ends without
    an error, replacing what was there; removed (and ``out_dir`` left untouched) when it raises."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if out_dir.exists():
            # Move the old dir aside first: at every moment one complete dir is on disk.
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_adapter_over(base_model, tokenizer, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """``out_dir`` as the adapter in ``adapter_dir`` over ``base_model`` (e.g. its base, quantized):
    the base written by ``save_model`` into ``out_dir/base``, the adapter's files copied beside it with
    ``base_model_name_or_path`` set to ``./base`` (``load_model`` reads it relative to the adapter dir, so
    the pair moves together). The adapter's weights are copied as they were trained. Atomic, as
    ``save_model``."""
    import json

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise ModelError(
            f"{adapter_dir} lacks {', '.join(missing)}: an adapter dir saved by polmctl (or peft's save_pretrained "
            "with safetensors) is needed"
        )
    with _replacing(out_dir) as tmp:
        save_model(base_model, tokenizer, tmp / "base")
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "./base"
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        shutil.copyfile(adapter_dir / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
        tokenizer.save_pretrained(tmp)
    return out_dir
