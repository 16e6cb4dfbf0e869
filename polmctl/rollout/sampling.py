"""The sampling options every online method shares (grpo, rloo, rejection_sampling, ppo).

    polmctl run recipe=grpo method.temperature=0.7 method.max_new_tokens=32 "method.stop=['\n\n']"

A method's dataclass inherits ``SamplingOptions`` so the same keys mean the same thing in
every recipe, and ``rollout.online.sample_and_score`` reads them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from polmctl.config.schema import ConfigError, _f, one_of, positive

GENERATION_BACKENDS = ("transformers", "vllm")


@dataclass
class SamplingOptions:
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    top_p: float = _f(1.0, "nucleus sampling of the rollouts")
    top_k: int = _f(0, "sample among the k likeliest tokens only; 0: the full distribution (transformers' "
                       "generate would otherwise apply its default of 50)")
    max_new_tokens: int = _f(64, "completion budget of each rollout")
    stop: List[str] = _f([], "stop strings: a completion ends after the first one it produces (kept in the text)")
    generation_backend: str = _f("transformers", "who samples the rollouts: transformers (any device) | "
                                                    "vllm (CUDA; pip install 'polmctl[vllm]')")
    vllm_gpu_memory_utilization: float = _f(0.3, "with generation_backend=vllm: share of the GPU's memory vLLM "
                                                 "keeps for its weights and KV cache (the rest stays with training)")
    merge_adapters_for_sampling: bool = _f(True, "with generation_backend=transformers: sample from a float32 LoRA "
                                                 "policy with its adapters merged into the base weights (same "
                                                 "samples up to float rounding, faster decoding; the base weights "
                                                 "are restored exactly after)")

    def check_sampling(self, section: str) -> None:
        positive(section, "max_new_tokens", self.max_new_tokens)
        positive(section, "temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{section}.top_p", f"must be in (0, 1], got {self.top_p!r}")
        positive(section, "top_k", self.top_k, zero_ok=True)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"{section}.stop", f"must be a list of non-empty strings, got {list(self.stop)!r}")
        one_of(section, "generation_backend", self.generation_backend, GENERATION_BACKENDS)
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError(f"{section}.vllm_gpu_memory_utilization",
                              f"must be in (0, 1), got {self.vllm_gpu_memory_utilization!r}")


@dataclass
class ScoredSamplingOptions(SamplingOptions):
    """Sampling whose samples a reward scores (grpo, rloo, rejection_sampling, ppo)."""

    rewards: List[Any] = _f(["math_answer"], "reward functions: registry names (math_answer, format, "
                                             "length_penalty, reward_model) or {name|_target_, weight, ...} specs; "
                                             "their weighted sum is the reward")

    def check_sampling(self, section: str) -> None:
        super().check_sampling(section)
        if not self.rewards:
            raise ConfigError(f"{section}.rewards", "needs at least one reward function or reward model, "
                                                    "e.g. [math_answer]")
