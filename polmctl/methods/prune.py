"""One-shot pruning, no training: its ``method`` node (the prune runner, polmctl/runners/prune.py,
does the work with polmctl/compress/prune.py).

    polmctl run recipe=prune                                     # Wanda, 50% of every decoder Linear
    polmctl run recipe=prune method.criterion=nm                 # 2:4 semi-structured
    polmctl run recipe=prune method.criterion=depth method.layer_fraction=0.25
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from polmctl.config.schema import one_of, option, positive
from polmctl.errors import ConfigError

CRITERIA = ("magnitude", "wanda", "nm", "depth")
NM_SCORES = ("magnitude", "wanda")


@dataclass
class PruneMethod:
    name: str = option("prune", "prune: one-shot pruning, no training")
    criterion: str = option(
        "wanda",
        "magnitude (unstructured |W|, per tensor) | wanda (|W| x ||X_j||, per output "
        "row) | nm (N:M semi-structured) | depth (drop whole decoder layers)",
    )
    sparsity: float = option(0.5, "magnitude / wanda: fraction of each pruned weight tensor set to zero, in [0, 1)")
    nm_n: int = option(2, "nm: keep the N best-scoring weights of every M consecutive ones along the input dim")
    nm_m: int = option(4, "nm: group size M along the input dim (2:4 is what sparse tensor cores run)")
    nm_score: str = option("wanda", "nm: score inside each group: magnitude | wanda")
    num_layers_to_drop: Optional[int] = option(None, "depth: decoder layers to remove (overrides layer_fraction)")
    layer_fraction: float = option(0.25, "depth: fraction of the decoder layers to remove (rounded), in (0, 1)")
    modules: List[str] = option(
        ["all-linear"],
        "Linear layers to prune inside the decoder blocks: ['all-linear'] or "
        "name parts, e.g. [mlp] or [q_proj, k_proj]; never embeddings/lm_head",
    )
    calibration_rows: int = option(
        128,
        "rows of the run's data (data.source, data.split) used for activation norms "
        "(wanda), layer importance (depth) and perplexity before/after",
    )
    calibration_batch_size: int = option(8, "rows per calibration forward pass")

    def check(self, section: str) -> None:
        one_of(section, "criterion", self.criterion, CRITERIA)
        one_of(section, "nm_score", self.nm_score, NM_SCORES)
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"{section}.sparsity", f"must be in [0, 1), got {self.sparsity!r}")
        positive(section, "nm_n", self.nm_n)
        positive(section, "nm_m", self.nm_m)
        if self.nm_n >= self.nm_m:
            raise ConfigError(f"{section}.nm_n", f"N:M needs N < M (keep N of every M), got {self.nm_n}:{self.nm_m}")
        if self.num_layers_to_drop is not None:
            positive(section, "num_layers_to_drop", self.num_layers_to_drop)
        if not 0 < self.layer_fraction < 1:
            raise ConfigError(f"{section}.layer_fraction", f"must be in (0, 1), got {self.layer_fraction!r}")
        if not self.modules:
            raise ConfigError(f"{section}.modules", "is empty; name modules or use ['all-linear']")
        positive(section, "calibration_rows", self.calibration_rows)
        positive(section, "calibration_batch_size", self.calibration_batch_size)
