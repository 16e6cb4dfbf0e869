"""The work both sides of benchmarks/vs_trl.py do: one description, read by each side's builder.

    .venv/bin/python benchmarks/vs_trl.py --methods sft,dpo,grpo     # (this module is a helper of it)

A ``Workload`` fixes everything that decides the cost of a step: the model and its dtype,
the rows (the first ``rows_needed`` of the builtin set, in order, no shuffling on either
side), the sequence limit, micro-batch size, gradient accumulation, the LoRA adapter
(same rank, alpha, targets, dropout 0), and for GRPO the group size and completion budget.
"""

from __future__ import annotations

from dataclasses import dataclass

MODELS = {"tiny": "builtin:tiny", "smollm2": "builtin:smollm2-135m"}
RECIPES = {"sft": "lora", "dpo": "dpo", "grpo": "grpo"}
DATA = {"sft": "builtin:arithmetic", "dpo": "builtin:arithmetic_preference", "grpo": "builtin:arithmetic"}


@dataclass
class Workload:
    method: str  # sft | dpo | grpo
    model: str = "smollm2"  # a key of MODELS
    dtype: str = "float32"  # weights and compute: float32 | bfloat16 (LoRA adapters stay float32)
    micro_batch_size: int = 8  # rows per forward pass (GRPO: completions)
    grad_accum: int = 1
    max_length: int = 256
    steps: int = 4  # optimizer steps this side will run in all (warm-up included)
    lora_r: int = 16
    lora_alpha: int = 32
    lr: float = 1e-4
    num_generations: int = 8  # GRPO: completions per prompt
    max_new_tokens: int = 48  # GRPO: completion budget
    temperature: float = 1.0  # GRPO: 1.0 so that both sides score the same distribution they sample
    beta: float = 0.1  # DPO: KL strength (GRPO keeps beta = 0, both sides' default)
    trl_precompute_ref: bool = False  # DPO: TRL precomputes reference log-probs too (its default: no)
    seed: int = 42

    @property
    def model_name(self) -> str:
        return MODELS[self.model]

    @property
    def rows_per_step(self) -> int:
        """Dataset rows one optimizer step consumes (GRPO: prompts)."""
        rows = self.micro_batch_size * self.grad_accum
        return rows // self.num_generations if self.method == "grpo" else rows

    @property
    def rows_needed(self) -> int:
        return self.rows_per_step * self.steps


def default_workload(method: str, **overrides) -> Workload:
    """The shapes of the method's recipe (conf/recipe/lora.yaml, dpo.yaml, grpo.yaml); DPO keeps the lr its
    recipe had when the figures in docs/performance.md were first taken (5e-5; the recipe now trains at 2e-4)."""
    shapes = {
        "sft": dict(micro_batch_size=8, grad_accum=1, lr=5e-4),
        "dpo": dict(micro_batch_size=4, grad_accum=2, lr=5e-5),
        "grpo": dict(micro_batch_size=16, grad_accum=2, lr=3e-4),
    }[method]
    return Workload(method=method, **{**shapes, **overrides})
