"""Knowledge editing, no training: its ``method`` node (the edit runner, polmctl/runners/edit.py,
does the work with polmctl/editing/).

    polmctl run recipe=edit                                      # ROME on builtin facts the model knows
    polmctl run recipe=edit method.algorithm=memit method.max_requests=10
    polmctl run recipe=edit method.requests=my_edits.jsonl method.layer=6
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from polmctl.config.schema import one_of, option, positive
from polmctl.errors import ConfigError

ALGORITHMS = ("rome", "memit")
TRACE_MODULES = ("hidden", "mlp")
FACT_TOKENS = ("subject_last", "last")
# The papers' norm bound on the optimised value, relative to the value it changes.
CLAMP_NORM = {"rome": 4.0, "memit": 0.75}


@dataclass
class EditMethod:
    name: str = option("edit", "edit: knowledge editing (ROME / MEMIT), no training")
    algorithm: str = option(
        "rome", "rome (one MLP layer, rank-one update per request) | memit (a batch over several layers)"
    )
    requests: str = option(
        "builtin:counterfacts",
        "edit requests: builtin:counterfacts (real facts, counterfactual targets), a .jsonl/.json/.csv/.parquet file "
        "or a hub dataset of {subject, prompt (with {}), target_new[, target_true, paraphrases, neighbours]} rows",
    )
    requests_split: str = option("train", "split of a hub dataset of requests")
    max_requests: int = option(4, "requests to apply (the first ones, after known_only)")
    known_only: bool = option(
        True,
        "builtin:counterfacts: keep only the facts the model answers (greedily) before the edit; a random model "
        "knows none, so turn it off there",
    )
    layer: Optional[int] = option(
        None, "rome: the layer to edit; memit: the last layer of the window. None: the layer causal tracing picks"
    )
    layers: List[int] = option([], "memit: the layers to spread the edits over; []: `window` layers ending at layer")
    window: int = option(4, "memit: how many consecutive layers, when layers is []")
    fact_token: str = option(
        "subject_last",
        "where a fact is read and written: subject_last (the paper's: the subject's last token) | last (the "
        "prompt's last token, the reference code's other strategy)",
    )
    trace_module: str = option(
        "hidden", "causal tracing restores: hidden (a decoder layer's output) | mlp (only its MLP's output)"
    )
    trace_samples: int = option(10, "causal tracing: noise draws per request")
    trace_noise: float = option(3.0, "causal tracing: noise std as a multiple of the subject embeddings' std")
    trace_requests: int = option(8, "causal tracing: how many of the requests the trace averages over")
    num_prefixes: int = option(10, "texts the model writes to put before a prompt (keys and values average over them)")
    prefix_tokens: int = option(10, "tokens of each prefix")
    v_steps: int = option(20, "Adam steps of the value optimisation (ROME 20, MEMIT 25)")
    v_lr: float = option(0.5, "learning rate of the value optimisation")
    v_weight_decay: float = option(0.5, "weight of |delta| / |value|^2 in the value loss")
    kl_factor: float = option(0.0625, "weight of the KL term on '{subject} is a' in the value loss")
    clamp_norm_factor: Optional[float] = option(
        None, "bound on |delta| as a multiple of |value|; None: the paper's (rome 4, memit 0.75)"
    )
    update_weight: Optional[float] = option(
        None,
        "memit: lambda, the weight of keeping the calibration keys' values against writing the new ones; "
        "None: the key dimension (MEMIT's 15000 is about GPT-J's 16384)",
    )
    calibration_rows: int = option(
        200, "rows of the run's data (data.source, data.split) for the keys' second moment C = E[k k^T]"
    )
    calibration_batch_size: int = option(8, "rows per calibration forward pass")
    fluency_rows: int = option(50, "held-out rows (data.source, data.eval_split) for perplexity before/after")
    batch_size: int = option(16, "prompts per scoring forward pass")

    def clamp(self) -> float:
        return self.clamp_norm_factor if self.clamp_norm_factor is not None else CLAMP_NORM[self.algorithm]

    def check(self, section: str) -> None:
        one_of(section, "algorithm", self.algorithm, ALGORITHMS)
        one_of(section, "trace_module", self.trace_module, TRACE_MODULES)
        one_of(section, "fact_token", self.fact_token, FACT_TOKENS)
        if not self.requests.strip():
            raise ConfigError(f"{section}.requests", "is empty; use builtin:counterfacts or a file of edit requests")
        for key in ("max_requests", "window", "trace_samples", "trace_requests", "prefix_tokens", "v_steps"):
            positive(section, key, getattr(self, key))
        for key in ("calibration_rows", "calibration_batch_size", "fluency_rows", "batch_size"):
            positive(section, key, getattr(self, key))
        positive(section, "num_prefixes", self.num_prefixes, zero_ok=True)
        for key in ("trace_noise", "v_lr"):
            positive(section, key, getattr(self, key))
        for key in ("v_weight_decay", "kl_factor"):
            positive(section, key, getattr(self, key), zero_ok=True)
        if self.clamp_norm_factor is not None:
            positive(section, "clamp_norm_factor", self.clamp_norm_factor)
        if self.update_weight is not None:
            positive(section, "update_weight", self.update_weight)
        if self.layer is not None and self.layer < 0:
            raise ConfigError(
                f"{section}.layer", f"must be a layer index >= 0 (or null for causal tracing), got {self.layer}"
            )
        if self.layers:
            if self.algorithm != "memit":
                raise ConfigError(
                    f"{section}.layers", "only memit spreads edits over layers; for rome set method.layer (one layer)"
                )
            if sorted(set(self.layers)) != list(self.layers) or self.layers[0] < 0:
                raise ConfigError(f"{section}.layers", f"must be distinct ascending layer indices, got {self.layers}")
