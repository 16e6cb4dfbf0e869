"""The ``method`` node of ``recipe=prune`` (``method.objective: prune``, run by ``runner: prune``).

Registered as ``"prune"`` in ``polmctl.objectives.METHOD_SCHEMAS``; kept free of torch so
the registry imports it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from polmctl.config.schema import ConfigError, _f, one_of, positive

CRITERIA = ("magnitude", "wanda", "nm", "depth")
NM_SCORES = ("magnitude", "wanda")


@dataclass
class PruneMethod:
    objective: str = _f("prune", "prune: one-shot pruning, no training (runner: prune)")
    criterion: str = _f("wanda", "magnitude (unstructured |W|, per tensor) | wanda (|W| x ||X_j||, per output "
                                    "row) | nm (N:M semi-structured) | depth (drop whole decoder layers)")
    sparsity: float = _f(0.5, "magnitude / wanda: fraction of each pruned weight tensor set to zero, in [0, 1)")
    nm_n: int = _f(2, "nm: keep the N best-scoring weights of every M consecutive ones along the input dim")
    nm_m: int = _f(4, "nm: group size M along the input dim (2:4 is what sparse tensor cores run)")
    nm_score: str = _f("wanda", "nm: score inside each group: magnitude | wanda")
    num_layers_to_drop: Optional[int] = _f(None, "depth: decoder layers to remove (overrides layer_fraction)")
    layer_fraction: float = _f(0.25, "depth: fraction of the decoder layers to remove (rounded), in (0, 1)")
    modules: List[str] = _f(["all-linear"], "Linear layers to prune inside the decoder blocks: ['all-linear'] or "
                                               "name parts, e.g. [mlp] or [q_proj, k_proj]; never embeddings/lm_head")
    calibration_rows: int = _f(128, "rows of the run's data (data.source, data.split) used for activation norms "
                                       "(wanda), layer importance (depth) and perplexity before/after")
    calibration_batch_size: int = _f(8, "rows per calibration forward pass")

    def check(self, section: str) -> None:
        one_of(section, "criterion", self.criterion, CRITERIA)
        one_of(section, "nm_score", self.nm_score, NM_SCORES)
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"{section}.sparsity", f"must be in [0, 1), got {self.sparsity!r}")
        positive(section, "nm_n", self.nm_n)
        positive(section, "nm_m", self.nm_m)
        if self.nm_n >= self.nm_m:
            raise ConfigError(f"{section}.nm_n", f"N:M needs N < M (keep N of every M), got "
                                                 f"{self.nm_n}:{self.nm_m}")
        if self.num_layers_to_drop is not None:
            positive(section, "num_layers_to_drop", self.num_layers_to_drop)
        if not 0 < self.layer_fraction < 1:
            raise ConfigError(f"{section}.layer_fraction", f"must be in (0, 1), got {self.layer_fraction!r}")
        if not self.modules:
            raise ConfigError(f"{section}.modules", "is empty; name modules or use ['all-linear']")
        positive(section, "calibration_rows", self.calibration_rows)
        positive(section, "calibration_batch_size", self.calibration_batch_size)
