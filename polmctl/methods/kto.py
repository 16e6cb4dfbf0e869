"""KTO (Ethayarajh et al., 2024) on unpaired rows {prompt, completion, label}.

    polmctl run recipe=kto method.desirable_weight=1.0 method.undesirable_weight=1.33

Features and the flag that controls each:
  reward scale (KL strength)      method.beta
  class weights                   method.desirable_weight, method.undesirable_weight
  reference log-probs, once       method.precompute_ref_logps (default true; cached on disk)
Each row's reward is r = log pi(y|x) - log ref(y|x); desirable rows are pushed above the
reference point, undesirable ones below it. The reference point is the batch KL estimate
from mismatched pairs: each prompt with another row's completion (a fixed partner chosen
at encode time, so its reference log-prob can be precomputed and cached like the rest). The
reference is held as DPO's (methods/reference.py); the loss is in polmctl/losses/preference.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import option, positive
from polmctl.data.preference import encode_preference_rows, pad_sequences
from polmctl.engine.contract import LossTerms, Objective
from polmctl.losses import IGNORE_INDEX
from polmctl.losses import preference as losses
from polmctl.methods.preference import precompute_reference, reference_logps, with_reference
from polmctl.methods.reference import Reference
from polmctl.models.forward import sequence_logps


@dataclass
class KTOMethod:
    name: str = option("kto", "kto: unpaired desirable / undesirable completions against a reference model")
    beta: float = option(0.1, "reward scale (strength of the KL constraint)")
    desirable_weight: float = option(1.0, "loss weight of desirable rows")
    undesirable_weight: float = option(1.0, "loss weight of undesirable rows (raise it when they are rarer)")
    precompute_ref_logps: bool = option(True, "score the data with the reference once before training (cached)")

    def check(self, section: str) -> None:
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            positive(section, name, getattr(self, name))


class KTOObjective(Objective):
    """Batches of B matched rows followed by the same prompts with mismatched completions."""

    def __init__(self, method: KTOMethod):
        self.method, self.pad_token_id = method, 0
        self.reference = Reference()

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id = tokenizer.pad_token_id
        examples, stats = encode_preference_rows(rows, tokenizer, data, recipe="kto", fmt="unpaired")
        for i, e in enumerate(examples):
            e["kl_completion_ids"] = examples[(i + 1) % len(examples)]["completion_ids"]
        return examples, stats

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for column in ("completion_ids", "kl_completion_ids"):
            for e in examples:
                seqs.append(e["prompt_ids"] + e[column])
                labels.append([IGNORE_INDEX] * len(e["prompt_ids"]) + e[column])
        batch = pad_sequences(seqs, labels, self.pad_token_id)
        batch["desirable"] = torch.tensor([e["label"] for e in examples])
        return with_reference(batch, examples)

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].size(0) // 2

    def prepare(
        self, model: torch.nn.Module, examples: list[dict], *, device: torch.device, model_id: str, cache_dir: Path
    ) -> str:
        if not self.method.precompute_ref_logps:
            return self.reference.freeze(model)
        return precompute_reference(
            self.reference,
            model,
            examples,
            self.collate,
            device=device,
            model_id=model_id,
            cache_dir=cache_dir,
            unit="rows",
        )

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        half = batch["input_ids"].size(0) // 2
        part = lambda sl: {k: batch[k][sl] for k in ("input_ids", "attention_mask", "labels")}  # noqa: E731
        policy, _ = sequence_logps(model, part(slice(0, half)))
        with torch.no_grad():  # the reference point carries no gradient
            policy_kl, _ = sequence_logps(model, part(slice(half, None)))
        ref, ref_kl = reference_logps(self.reference, model, batch, policy)
        kl = losses.kto_kl_estimate(policy_kl, ref_kl)
        m = self.method
        loss, metrics = losses.kto_loss(
            policy,
            ref,
            batch["desirable"],
            kl,
            beta=m.beta,
            desirable_weight=m.desirable_weight,
            undesirable_weight=m.undesirable_weight,
        )
        desirable = batch["desirable"].bool()
        subsets = {"chosen": desirable, "rejected": ~desirable}  # TRL's names for the desirable / undesirable rows
        logged = {}
        for name, rows in subsets.items():  # means over each subset, not over the whole batch
            count = rows.sum()
            logged[f"rewards/{name}"] = (metrics[f"rewards/{name}"].sum(), count)
            logged[f"logps/{name}"] = (policy.detach()[rows].sum(), count)
        logged["kl"] = kl * half
        return LossTerms(loss_sum=loss.sum(), weight=half, metrics=logged)
