"""The sampling options every online method shares (grpo, rloo, rejection_sampling, ppo, distill),
and ``sample_and_score``: sample completions of prompts and score them with reward functions.

    polmctl run recipe=grpo method.temperature=0.7 method.max_new_tokens=32 "method.stop=['\n\n']"
    polmctl run recipe=grpo method.generation_backend=vllm method.vllm_mode=server \
        method.vllm_server_url=http://127.0.0.1:8000      # with `polmctl rollout-server MODEL` running

A method's dataclass inherits ``SamplingOptions`` so the same keys mean the same thing in
every recipe, and ``sample_and_score`` reads them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List
from urllib.parse import urlsplit

import torch

from polmctl.config.schema import one_of, option, positive
from polmctl.data import format_prompt
from polmctl.data.prompts import prompt_of
from polmctl.errors import ConfigError
from polmctl.rollout.backends import TransformersBackend
from polmctl.rollout.reward_data import PROMPT_COLUMNS
from polmctl.rollout.rewards import CombinedReward

GENERATION_BACKENDS = ("transformers", "vllm")
VLLM_MODES = ("colocate", "server")


@dataclass
class SamplingOptions:
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    top_p: float = option(1.0, "nucleus sampling of the rollouts")
    top_k: int = option(
        0,
        "sample among the k likeliest tokens only; 0: the full distribution (transformers' "
        "generate would otherwise apply its default of 50)",
    )
    max_new_tokens: int = option(64, "completion budget of each rollout")
    stop: List[str] = option([], "stop strings: a completion ends after the first one it produces (kept in the text)")
    generation_backend: str = option(
        "transformers", "who samples the rollouts: transformers (any device) | vllm (CUDA; pip install 'polmctl[vllm]')"
    )
    vllm_gpu_memory_utilization: float = option(
        0.3,
        "with generation_backend=vllm: share of the GPU's memory vLLM "
        "keeps for its weights and KV cache (the rest stays with training)",
    )
    vllm_mode: str = option(
        "colocate",
        "with generation_backend=vllm: colocate (vLLM in the training process) | server (a `polmctl "
        "rollout-server` at vllm_server_url samples, and the trainer pushes the policy's weights to it)",
    )
    vllm_server_url: str = option(
        "http://127.0.0.1:8000", "with vllm_mode=server: the rollout server's address (http://host:port)"
    )
    vllm_server_timeout: float = option(
        600.0,
        "with vllm_mode=server: seconds to wait for the server to come up at the start, and for each "
        "answer (a rollout, a weight push)",
    )
    vllm_sleep_mode: bool = option(
        False,
        "with vllm_mode=colocate: vLLM sleeps between rollouts, its weights and KV cache freed for "
        "training, and wakes for each (TRL's vllm_enable_sleep_mode; CUDA)",
    )
    merge_adapters_for_sampling: bool = option(
        True,
        "with generation_backend=transformers: sample from a float32 LoRA "
        "policy with its adapters merged into the base weights (same "
        "samples up to float rounding, faster decoding; the base weights "
        "are restored exactly after)",
    )

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
            raise ConfigError(
                f"{section}.vllm_gpu_memory_utilization", f"must be in (0, 1), got {self.vllm_gpu_memory_utilization!r}"
            )
        self._check_vllm_mode(section)

    def _check_vllm_mode(self, section: str) -> None:
        one_of(section, "vllm_mode", self.vllm_mode, VLLM_MODES)
        colocated = self.generation_backend == "vllm" and self.vllm_mode == "colocate"
        if self.vllm_mode == "server" and self.generation_backend != "vllm":
            raise ConfigError(
                f"{section}.vllm_mode",
                f"server samples through a rollout server, but generation_backend is "
                f"{self.generation_backend!r}; set {section}.generation_backend=vllm",
            )
        if self.vllm_sleep_mode and not colocated:
            raise ConfigError(
                f"{section}.vllm_sleep_mode",
                "puts a vLLM in the training process to sleep: it needs generation_backend=vllm with "
                "vllm_mode=colocate (a rollout server keeps its own engine)",
            )
        positive(section, "vllm_server_timeout", self.vllm_server_timeout)
        url = urlsplit(self.vllm_server_url)
        try:
            port = url.port
        except ValueError:
            port = None
        if url.scheme != "http" or not url.hostname or port is None or url.path not in ("", "/"):
            raise ConfigError(
                f"{section}.vllm_server_url",
                f"must be http://host:port (the address `polmctl rollout-server` prints), got {self.vllm_server_url!r}",
            )


@dataclass
class ScoredSamplingOptions(SamplingOptions):
    """Sampling whose samples a reward scores (grpo, rloo, rejection_sampling, ppo)."""

    rewards: List[Any] = option(
        ["math_answer"],
        "reward functions: registry names (math_answer, format, "
        "length_penalty, reward_model, prm) or {name|_target_, weight, ...} specs; "
        "their weighted sum is the reward",
    )

    def check_sampling(self, section: str) -> None:
        super().check_sampling(section)
        if not self.rewards:
            raise ConfigError(
                f"{section}.rewards", "needs at least one reward function or reward model, e.g. [math_answer]"
            )


def sample_and_score(
    model,
    tokenizer,
    reward: CombinedReward,
    rows: list[dict],
    samples_per_prompt: int,
    options,
    *,
    batch_index: int,
    backend=None,
) -> tuple[list[list[int]], list[str], torch.Tensor, dict]:
    """``samples_per_prompt`` sampled completions of each row's prompt, in one generation batch
    (grouped: a row's samples are consecutive): their token ids, texts, total reward, and
    each reward function's values. The rewards see the rows' other columns (e.g. answer).
    ``backend`` (polmctl.rollout.backends; None: transformers) samples with the options'
    temperature, top_p, max_new_tokens and stop strings."""
    backend = backend or TransformersBackend()
    prompts = [format_prompt(prompt_of(r), tokenizer) for r in rows]
    ids = backend.sample(model, tokenizer, prompts, samples_per_prompt, options)
    expanded = [r for r in rows for _ in range(samples_per_prompt)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    columns = {k: [r.get(k) for r in expanded] for k in expanded[0] if k not in PROMPT_COLUMNS}
    total, parts = reward([prompt_of(r) for r in expanded], texts, columns, batch_index=batch_index)
    return ids, texts, total, parts
