"""Low-rank compression, no training: its ``method`` node (the lowrank runner, polmctl/runners/lowrank.py,
does the work with polmctl/compress/lowrank.py).

    polmctl run recipe=lowrank                                        # ASVD, factors keep 80% of the parameters
    polmctl run recipe=lowrank method.rank_by=energy method.energy=0.95
    polmctl run recipe=lowrank_heal                                   # then a LoRA SFT stage heals it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from polmctl.compress.lowrank import RANK_BY
from polmctl.config.schema import one_of, option, positive
from polmctl.errors import ConfigError

SAVE_FORMATS = ("factored", "dense")


@dataclass
class LowRankMethod:
    name: str = option("lowrank", "lowrank: truncated-SVD compression of Linear layers, no training")
    rank_by: str = option(
        "params",
        "how each layer's rank is chosen: params (the factors keep param_ratio of the layer's parameters) | "
        "energy (the fewest singular values that keep `energy` of their sum of squares)",
    )
    param_ratio: float = option(0.8, "rank_by=params: fraction of each layer's parameters the two factors keep")
    energy: float = option(
        0.9, "rank_by=energy: fraction of the sum of squared singular values kept (layers past break-even stay dense)"
    )
    activation_aware: bool = option(
        True, "ASVD: scale input channels by their calibration activation norms before the SVD, unscale after"
    )
    alpha: float = option(0.5, "activation_aware: exponent of the activation norms in the channel scales (ASVD's)")
    modules: List[str] = option(
        ["all-linear"],
        "Linear layers to factor inside the decoder blocks: ['all-linear'] or name parts, e.g. [mlp] or "
        "[q_proj, k_proj]; never embeddings/lm_head",
    )
    save_format: str = option(
        "factored",
        "factored (two Linears per layer: fewer parameters; loads with polmctl, models/replaced.py) | dense "
        "(the factors multiplied back: a standard model dir any from_pretrained loads, no parameter saving)",
    )
    calibration_rows: int = option(
        64, "rows of the run's data (data.source, data.split) for activation norms and perplexity before/after"
    )
    calibration_batch_size: int = option(8, "rows per calibration forward pass")

    def check(self, section: str) -> None:
        one_of(section, "rank_by", self.rank_by, RANK_BY)
        one_of(section, "save_format", self.save_format, SAVE_FORMATS)
        if not 0 < self.param_ratio < 1:
            raise ConfigError(f"{section}.param_ratio", f"must be in (0, 1), got {self.param_ratio!r}")
        if not 0 < self.energy <= 1:
            raise ConfigError(f"{section}.energy", f"must be in (0, 1], got {self.energy!r}")
        positive(section, "alpha", self.alpha)
        if not self.modules:
            raise ConfigError(f"{section}.modules", "is empty; name modules or use ['all-linear']")
        positive(section, "calibration_rows", self.calibration_rows)
        positive(section, "calibration_batch_size", self.calibration_batch_size)
