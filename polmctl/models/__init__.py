"""Models: builtin / hub / local loading, dtype, bitsandbytes quantization, peft adapters, saving."""

from polmctl.models.adapters import apply_peft, trainable_parameter_summary
from polmctl.models.builtin import BUILTIN_MODELS, materialise_builtin
from polmctl.models.cache import cache_root
from polmctl.models.load import (
    head_of,
    is_reward_model,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_head,
    resolve_model_path,
)
from polmctl.models.save import save_model

__all__ = [
    "cache_root",
    "BUILTIN_MODELS",
    "materialise_builtin",
    "resolve_model_path",
    "load_tokenizer",
    "load_model",
    "load_model_and_tokenizer",
    "model_head",
    "head_of",
    "is_reward_model",
    "apply_peft",
    "trainable_parameter_summary",
    "save_model",
]
