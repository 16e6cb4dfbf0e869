"""Offline preference optimisation on paired rows: DPO (and its IPO / robust / hinge losses),
SimPO, CPO and ORPO, all through the one engine.

    polmctl run recipe=dpo method.beta=0.2
    polmctl run recipe=ipo
    polmctl run recipe=dpo method.loss=apo_zero        # or bco_pair, apo_down, nca_pair, sppo_hard
    polmctl run recipe=dpo method.loss=exo_pair method.label_smoothing=1e-3
    polmctl run recipe=simpo method.gamma=0.5
    polmctl run recipe=cpo | orpo

Features and the flag that controls each:
  loss family                     method=dpo | simpo | cpo | orpo (the recipe picks it)
  DPO variants                    method.loss: sigmoid | ipo | robust | hinge | bco_pair | apo_zero | apo_down
                                  | exo_pair | nca_pair | sppo_hard; method.label_smoothing (EXO's epsilon)
  reference log-probs, once       method.precompute_ref_logps (default true; cached on disk)
  an SFT term on chosen answers   method.sft_weight (DPO: RPO; SimPO: CPO-SimPO; CPO and ORPO: 1)
  no second model copy with LoRA  the reference is the policy with its adapters disabled (methods/reference.py)
Chosen and rejected go through the model as one batch of 2B rows; each pair's prompt runs once,
the LM head only on answer tokens, and log-probs are gathered with a logsumexp rather than a
full log-softmax (polmctl/models/forward.py). The losses are in polmctl/losses/preference.py.

CPO and ORPO add the NLL of the chosen answer averaged over its own tokens, then over pairs (the
papers' per-sequence NLL), weighted by method.sft_weight (1 for them; DPO's RPO term and SimPO's
CPO-SimPO term are the same NLL, off by default). TRL averages that NLL over all chosen tokens of the
batch instead, so long answers weigh more there; the two agree when the chosen answers have equal
lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import one_of, option, positive
from polmctl.data.preference import encode_preference_rows, preference_collate
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError
from polmctl.losses import preference as losses
from polmctl.methods.reference import Reference, cached_logps
from polmctl.models.forward import sequence_logps


@dataclass
class DPOMethod:
    name: str = option("dpo", "dpo: direct preference optimisation against a reference model")
    loss: str = option(
        "sigmoid",
        "sigmoid (DPO) | ipo | robust (cDPO) | hinge | bco_pair | apo_zero | apo_down | exo_pair | "
        "nca_pair | sppo_hard (formulas: polmctl/losses/preference.py dpo_loss, docs/alignment.md)",
    )
    beta: float = option(0.1, "strength of the KL constraint to the reference (higher: stay closer)")
    label_smoothing: float = option(
        0.0, "assumed fraction of flipped labels (sigmoid: conservative DPO, robust; exo_pair: EXO's epsilon)"
    )
    precompute_ref_logps: bool = option(True, "score the data with the reference once before training (cached)")
    sft_weight: float = option(
        0.0, "weight of the chosen answer's NLL added to the loss (RPO, Pang et al. 2024; TRL's rpo_alpha)"
    )

    def check(self, section: str) -> None:
        one_of(section, "loss", self.loss, losses.DPO_LOSS_TYPES)
        positive(section, "beta", self.beta)
        positive(section, "sft_weight", self.sft_weight, zero_ok=True)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{section}.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.loss == "exo_pair" and self.label_smoothing == 0:
            raise ConfigError(
                f"{section}.label_smoothing",
                "is EXO's epsilon with loss=exo_pair and must be > 0 (log epsilon); the EXO paper suggests 1e-3",
            )


@dataclass
class SimPOMethod:
    name: str = option("simpo", "simpo: reference-free, length-normalised rewards with a target margin")
    beta: float = option(2.0, "reward scale")
    gamma: float = option(0.5, "target reward margin between chosen and rejected (TRL's simpo_gamma)")
    sft_weight: float = option(
        0.0, "weight of the chosen answer's NLL added to the loss (CPO-SimPO; TRL's cpo_alpha with loss_type=simpo)"
    )

    def check(self, section: str) -> None:
        positive(section, "beta", self.beta)
        positive(section, "gamma", self.gamma, zero_ok=True)
        positive(section, "sft_weight", self.sft_weight, zero_ok=True)


@dataclass
class CPOMethod:
    name: str = option("cpo", "cpo: reference-free preference term plus NLL on the chosen answer")
    beta: float = option(0.1, "scale of the preference term's log-ratio")
    sft_weight: float = option(1.0, "weight of the chosen answer's NLL (TRL's cpo_alpha; 0: the preference term alone)")

    def check(self, section: str) -> None:
        positive(section, "beta", self.beta)
        positive(section, "sft_weight", self.sft_weight, zero_ok=True)


@dataclass
class ORPOMethod:
    name: str = option("orpo", "orpo: SFT on chosen plus an odds-ratio penalty on rejected, no reference")
    beta: float = option(0.1, "weight of the odds-ratio term (lambda in the paper)")
    sft_weight: float = option(1.0, "weight of the chosen answer's NLL (the paper's SFT term, 1)")

    def check(self, section: str) -> None:
        positive(section, "beta", self.beta)
        positive(section, "sft_weight", self.sft_weight, zero_ok=True)


class PairwiseObjective(Objective):
    """Scores a concatenated chosen/rejected batch and applies the method's loss."""

    def __init__(self, method: Any):
        self.method, self.pad_token_id = method, 0
        self.needs_reference = method.name == "dpo"
        self.reference = Reference()

    # -- data ------------------------------------------------------------------------------
    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id = tokenizer.pad_token_id
        return encode_preference_rows(rows, tokenizer, data, recipe=self.method.name)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return with_reference(preference_collate(examples, self.pad_token_id), examples)

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].size(0) // 2

    # -- reference -------------------------------------------------------------------------
    def prepare(
        self, model: torch.nn.Module, examples: list[dict], *, device: torch.device, model_id: str, cache_dir: Path
    ) -> str:
        """Give every example its reference log-probs (cached), or hold the reference for every step."""
        if not self.needs_reference:
            return "no reference model (reference-free method)"
        if not self.method.precompute_ref_logps:
            return self.reference.freeze(model)
        return precompute_reference(
            self.reference, model, examples, self.collate, device=device, model_id=model_id, cache_dir=cache_dir
        )

    # -- the step --------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        logps, lengths = sequence_logps(model, batch)
        half = logps.size(0) // 2
        chosen, rejected = logps[:half], logps[half:]
        n_c, n_r = lengths[:half].clamp(min=1), lengths[half:].clamp(min=1)
        m = self.method
        if m.name == "dpo":
            ref_chosen, ref_rejected = reference_logps(self.reference, model, batch, logps)
            if m.loss == "ipo":  # IPO is defined on length-averaged log-probs (as in TRL)
                chosen, rejected, ref_chosen, ref_rejected = (
                    chosen / n_c,
                    rejected / n_r,
                    ref_chosen / n_c,
                    ref_rejected / n_r,
                )
            loss, metrics = losses.dpo_loss(
                chosen,
                rejected,
                ref_chosen,
                ref_rejected,
                beta=m.beta,
                loss_type=m.loss,
                label_smoothing=m.label_smoothing,
            )
        elif m.name == "simpo":
            loss, metrics = losses.simpo_loss(chosen / n_c, rejected / n_r, beta=m.beta, gamma=m.gamma)
        elif m.name == "cpo":
            loss, metrics = losses.cpo_loss(chosen, rejected, beta=m.beta)
        else:  # orpo
            loss, metrics = losses.orpo_loss(chosen / n_c, rejected / n_r, beta=m.beta)
        metrics = {k: v.detach().float().sum() for k, v in metrics.items()}
        if m.sft_weight:  # + the chosen answer's NLL, per sequence (on the raw log-probs, not IPO's averages)
            nll = -logps[:half] / n_c
            loss = loss + m.sft_weight * nll
            metrics["nll"] = nll.detach().sum()
        metrics["logps/chosen"] = chosen.detach().sum()
        metrics["logps/rejected"] = rejected.detach().sum()
        return LossTerms(loss_sum=loss.sum(), weight=half, metrics=metrics)


def reference_logps(
    reference: Reference, model: torch.nn.Module, batch: dict, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's summed log-probs of a batch's first and second halves: precomputed (the
    batch's ``ref_logps``, [B, 2]) or run now."""
    if "ref_logps" in batch:
        return batch["ref_logps"].to(like).unbind(-1)
    logps = reference.run(model, lambda ref: sequence_logps(ref, batch)[0])
    half = logps.size(0) // 2
    return logps[:half], logps[half:]


def precompute_reference(
    reference: Reference,
    model: torch.nn.Module,
    examples: list[dict],
    collate,
    *,
    device: torch.device,
    model_id: str,
    cache_dir: Path,
    unit: str = "pairs",
    batch_size: int = 8,
) -> str:
    """Every example's reference log-probs (``e["ref_logps"]``: the pair's two), from the cache or one
    pass over the examples before training (the policy has not moved yet: it is the reference)."""

    def compute(chunk_examples: list[dict]) -> torch.Tensor:
        values = []
        for i in range(0, len(chunk_examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(chunk_examples[i : i + batch_size]).items()}
            logps = reference.run(model, lambda ref: sequence_logps(ref, batch)[0], at_start=True)
            half = logps.size(0) // 2
            values.append(torch.stack([logps[:half], logps[half:]], dim=-1).cpu())
        return torch.cat(values)

    values, note = cached_logps(cache_dir, model_id, examples, compute, unit)
    for e, pair in zip(examples, values.tolist()):
        e["ref_logps"] = tuple(pair)
    return note


def with_reference(batch: dict, examples: list[dict]) -> dict:
    """Add the examples' precomputed reference log-probs ([B, 2]: first half, second half);
    without them for every example the method runs the reference on this batch."""
    if all("ref_logps" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
    return batch
