"""Model merging, no training: its ``method`` node (the merge runner, polmctl/runners/merge.py,
does the work with polmctl/merge/).

    polmctl run recipe=merge "method.models=[<run dir A>,<run dir B>]" method.merge=ties
    polmctl run recipe=merge "method.models=[A,B]" method.merge=linear "method.weights=[0.7,0.3]"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from polmctl.config.schema import one_of, option
from polmctl.errors import ConfigError
from polmctl.merge.methods import DTYPES, MERGES, SIGN_METHODS


@dataclass
class MergeMethod:
    name: str = option("merge", "merge: combine the weights of several models, no training")
    merge: str = option(
        "ties",
        "linear (weighted average) | task_arithmetic (base + sum of w_i x task vector) | ties "
        "(trim, elect sign, disjoint merge) | dare_linear / dare_ties (random drop + rescale, "
        "then sum / TIES) | slerp (spherical interpolation of two models)",
    )
    models: List[str] = option(
        [],
        "the models to merge: run dirs (their final/), model dirs, LoRA adapter dirs, "
        "builtin:<name> or hub ids; all on one base (same architecture, shapes, tokenizer)",
    )
    weights: Optional[List[float]] = option(
        None,
        "one weight per model; None: 1/N each for linear (an average), 1.0 "
        "each for the task-vector merges (every task vector added whole)",
    )
    normalize: bool = option(True, "linear: divide the weights by their sum, so the result is a weighted average")
    base: Optional[str] = option(
        None,
        "the base model whose weights are subtracted to get task vectors (task_arithmetic, "
        "ties, dare_*); None: the base the LoRA adapters among method.models name",
    )
    density: float = option(
        0.5,
        "ties / dare_*: fraction of each task vector's entries kept (ties: the largest; "
        "dare: at random, rescaled by 1 / density), in (0, 1]",
    )
    majority_sign_method: str = option(
        "total",
        "ties / dare_ties sign election: total (sign of the summed values) | "
        "frequency (the sign most task vectors have)",
    )
    slerp_t: float = option(0.5, "slerp: interpolation factor in [0, 1]; 0 gives models[0], 1 gives models[1]")
    dtype: str = option(
        "auto",
        "dtype of the merged weights: auto (the first model's) | float32 | bfloat16 | float16; "
        "merging itself computes in float32",
    )
    max_shard_mb: int = option(
        2048,
        "the merged weights are written in safetensors shards of at most this many MB as "
        "they are computed, so memory holds one shard, not the whole model",
    )

    def check(self, section: str) -> None:
        one_of(section, "merge", self.merge, MERGES)
        one_of(section, "majority_sign_method", self.majority_sign_method, SIGN_METHODS)
        one_of(section, "dtype", self.dtype, DTYPES)
        if not 0 < self.density <= 1:
            raise ConfigError(f"{section}.density", f"must be in (0, 1], got {self.density!r}")
        if not 0 <= self.slerp_t <= 1:
            raise ConfigError(f"{section}.slerp_t", f"must be in [0, 1], got {self.slerp_t!r}")
        if self.max_shard_mb < 1:
            raise ConfigError(f"{section}.max_shard_mb", f"must be >= 1, got {self.max_shard_mb!r}")
        if self.merge == "slerp" and self.models and len(self.models) != 2:
            raise ConfigError(f"{section}.models", f"slerp interpolates exactly two models, got {len(self.models)}")
        if self.merge == "slerp" and self.weights is not None:
            raise ConfigError(f"{section}.weights", "slerp takes method.slerp_t, not weights; remove method.weights")
        if self.weights is not None:
            if self.models and len(self.weights) != len(self.models):
                raise ConfigError(
                    f"{section}.weights",
                    f"has {len(self.weights)} entries for {len(self.models)} models; give one weight per model",
                )
            if self.merge == "linear" and self.normalize and sum(self.weights) == 0:
                raise ConfigError(
                    f"{section}.weights",
                    "sum to 0, which a normalized average cannot divide by; change them or set method.normalize=false",
                )

    def model_weights(self) -> List[float]:
        """The weight of each model, defaults and normalization applied (slerp: 1 - t and t)."""
        n = len(self.models)
        if self.merge == "slerp":
            return [1.0 - self.slerp_t, self.slerp_t]
        if self.weights is None:
            return [1.0 / n] * n if self.merge == "linear" else [1.0] * n
        weights = [float(w) for w in self.weights]
        if self.merge == "linear" and self.normalize:
            total = sum(weights)
            weights = [w / total for w in weights]
        return weights
