"""Objectives: pure loss functions of tensors, one file per family, and the registry.

``method.objective`` in a config names an entry of ``OBJECTIVES``; the rest of the
``method`` node is validated against the matching dataclass in ``METHOD_SCHEMAS``.
"""

from __future__ import annotations

from typing import Any, Callable

from polmctl.compress.config import PruneMethod
from polmctl.compress.quantize import QuantizeMethod
from polmctl.merge.config import MergeMethod
from polmctl.objectives.base import LossTerms, Objective
from polmctl.objectives.distill import DistillMethod, DistillObjective
from polmctl.objectives.online import GRPOMethod, GRPOObjective
from polmctl.objectives.ppo import PPOMethod, PPOObjective
from polmctl.objectives.pairwise import CPOMethod, DPOMethod, ORPOMethod, PairwiseObjective, SimPOMethod
from polmctl.objectives.rejection import RejectionSamplingMethod, RejectionSamplingObjective
from polmctl.objectives.reward import RewardMethod, RewardObjective
from polmctl.objectives.sft import SFTMethod, SFTObjective
from polmctl.objectives.unpaired import KTOMethod, KTOObjective
from polmctl.pipeline import PipelineMethod
from polmctl.multimodal.config import VlmMethod

METHOD_SCHEMAS: dict[str, type] = {"sft": SFTMethod, "dpo": DPOMethod, "simpo": SimPOMethod, "cpo": CPOMethod,
                                   "orpo": ORPOMethod, "kto": KTOMethod, "reward_model": RewardMethod,
                                   "grpo": GRPOMethod, "rejection_sampling": RejectionSamplingMethod,
                                   "ppo": PPOMethod, "prune": PruneMethod, "distill": DistillMethod,
                                   "quantize": QuantizeMethod, "pipeline": PipelineMethod, "vlm": VlmMethod,
                                   "merge": MergeMethod}
OBJECTIVES: dict[str, Callable[[Any], Objective]] = {"sft": SFTObjective, "dpo": PairwiseObjective,
                                                    "simpo": PairwiseObjective, "cpo": PairwiseObjective,
                                                    "orpo": PairwiseObjective, "kto": KTOObjective,
                                                    "reward_model": RewardObjective, "grpo": GRPOObjective,
                                                    "rejection_sampling": RejectionSamplingObjective,
                                                    "ppo": PPOObjective, "distill": DistillObjective}

__all__ = ["LossTerms", "Objective", "METHOD_SCHEMAS", "OBJECTIVES", "build_objective"]


def build_objective(method: Any) -> Objective:
    return OBJECTIVES[method.objective](method)
