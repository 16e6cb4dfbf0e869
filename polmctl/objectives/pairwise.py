"""Offline preference optimisation on paired rows: DPO (and its IPO / robust / hinge
losses), SimPO, CPO and ORPO, all through the one engine.

    polmctl run recipe=dpo method.beta=0.2
    polmctl run recipe=ipo
    polmctl run recipe=simpo method.gamma=0.5
    polmctl run recipe=orpo

Features and the flag that controls each:
  loss family                     method.objective: dpo | simpo | cpo | orpo
  DPO variants                    method.loss: sigmoid | ipo | robust | hinge, method.label_smoothing
  reference log-probs, once       method.precompute_ref_logps (default true; cached on disk)
  no second model copy with LoRA  the reference is the policy with its adapters disabled
Chosen and rejected go through the model as one batch of 2B rows; logits are computed
only from the first answer position on, and log-probs are gathered with a logsumexp
rather than a full log-softmax.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import ConfigError, one_of, positive
from polmctl.data.preference import encode_preference_rows, preference_collate
from polmctl.objectives import preference as losses
from polmctl.objectives.base import LossTerms, token_logps


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class DPOMethod:
    objective: str = _help("dpo", "dpo: direct preference optimisation against a reference model")
    loss: str = _help("sigmoid", "sigmoid (DPO) | ipo | robust (cDPO) | hinge")
    beta: float = _help(0.1, "strength of the KL constraint to the reference (higher: stay closer)")
    label_smoothing: float = _help(0.0, "assumed fraction of flipped labels (sigmoid: conservative DPO, robust)")
    precompute_ref_logps: bool = _help(True, "score the data with the reference once before training (cached)")

    def check(self, section: str) -> None:
        one_of(section, "loss", self.loss, ("sigmoid", "ipo", "robust", "hinge"))
        positive(section, "beta", self.beta)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"{section}.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing!r}")


@dataclass
class SimPOMethod:
    objective: str = _help("simpo", "simpo: reference-free, length-normalised rewards with a target margin")
    beta: float = _help(2.0, "reward scale")
    gamma: float = _help(0.5, "target reward margin between chosen and rejected")

    def check(self, section: str) -> None:
        positive(section, "beta", self.beta)
        positive(section, "gamma", self.gamma, zero_ok=True)


@dataclass
class CPOMethod:
    objective: str = _help("cpo", "cpo: reference-free preference term plus NLL on the chosen answer")
    beta: float = _help(0.1, "scale of the preference term's log-ratio")

    def check(self, section: str) -> None:
        positive(section, "beta", self.beta)


@dataclass
class ORPOMethod:
    objective: str = _help("orpo", "orpo: SFT on chosen plus an odds-ratio penalty on rejected, no reference")
    beta: float = _help(0.1, "weight of the odds-ratio term (lambda in the paper)")

    def check(self, section: str) -> None:
        positive(section, "beta", self.beta)


def sequence_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's labelled tokens, and how many there are. A pair's chosen
    and rejected rows share their prompt, which runs once (objectives/shared_prompt.py)."""
    logps, mask = token_logps(model, batch, share_prompts=True)
    return (logps * mask).sum(-1), mask.sum(-1)


class PairwiseObjective:
    """Scores a concatenated chosen/rejected batch and applies the method's loss."""

    needs_reference = False

    def __init__(self, method: Any, pad_token_id: int = 0):
        self.method, self.pad_token_id = method, pad_token_id
        self.needs_reference = method.objective == "dpo"
        self.reference: torch.nn.Module | None = None  # a frozen copy, for full fine-tuning only

    # -- data ------------------------------------------------------------------------------
    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id = tokenizer.pad_token_id
        return encode_preference_rows(rows, tokenizer, data, recipe=self.method.objective)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return with_reference(preference_collate(examples, self.pad_token_id), examples)

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].size(0) // 2

    # -- reference -------------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = model.training
        model.eval()
        try:
            if self.reference is not None:
                logps, _ = sequence_logps(self.reference, batch)
            elif hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    logps, _ = sequence_logps(model, batch)
            else:
                logps, _ = sequence_logps(model, batch)  # before training the policy is the reference
        finally:
            model.train(was_training)
        half = logps.size(0) // 2
        return logps[:half], logps[half:]

    def prepare(self, model: torch.nn.Module, examples: list[dict], *, device: torch.device, model_id: str,
                cache_dir: Path, batch_size: int = 8) -> str:
        """Give every example its reference log-probs, from the cache or one pass over the data.

        Returns how they were obtained, for the run's log. Without precomputation a full
        fine-tuning run keeps a frozen copy of the starting model as its reference.
        """
        if not self.needs_reference:
            return "no reference model (reference-free objective)"
        if not self.method.precompute_ref_logps:
            if not hasattr(model, "disable_adapter"):
                self.reference = copy.deepcopy(model).eval().requires_grad_(False)
                return "reference: a frozen copy of the starting model"
            return "reference: the policy with its adapters disabled, every step"
        path = cache_dir / f"{reference_cache_key(model_id, examples)}.pt"
        if path.exists():
            cached = torch.load(path)
            for e, pair in zip(examples, cached.tolist()):
                e["ref_logps"] = tuple(pair)
            return f"reference log-probs: reused {path}"
        values = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            chosen, rejected = self.reference_logps(model, batch)
            values += list(zip(chosen.tolist(), rejected.tolist()))
        for e, pair in zip(examples, values):
            e["ref_logps"] = pair
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{id(values)}")
        torch.save(torch.tensor(values), tmp)
        tmp.replace(path)
        return f"reference log-probs: computed once for {len(values)} pairs, cached in {path}"

    # -- the step --------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        logps, lengths = sequence_logps(model, batch)
        half = logps.size(0) // 2
        chosen, rejected = logps[:half], logps[half:]
        m = self.method
        if m.objective == "dpo":
            if "ref_logps" in batch:
                ref_chosen, ref_rejected = batch["ref_logps"].to(logps).unbind(-1)
            else:
                ref_chosen, ref_rejected = self.reference_logps(model, batch)
            if m.loss == "ipo":  # IPO is defined on length-averaged log-probs (as in TRL)
                n_c, n_r = lengths[:half].clamp(min=1), lengths[half:].clamp(min=1)
                chosen, rejected, ref_chosen, ref_rejected = chosen / n_c, rejected / n_r, ref_chosen / n_c, ref_rejected / n_r
            loss, metrics = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=m.beta,
                                            loss_type=m.loss, label_smoothing=m.label_smoothing)
        elif m.objective == "simpo":
            avg_c, avg_r = chosen / lengths[:half].clamp(min=1), rejected / lengths[half:].clamp(min=1)
            loss, metrics = losses.simpo_loss(avg_c, avg_r, beta=m.beta, gamma=m.gamma)
        elif m.objective == "cpo":
            loss, metrics = losses.cpo_loss(chosen, rejected, beta=m.beta)
            loss = loss - chosen / lengths[:half].clamp(min=1)  # + NLL of the chosen answer
        else:  # orpo
            avg_c, avg_r = chosen / lengths[:half].clamp(min=1), rejected / lengths[half:].clamp(min=1)
            loss, metrics = losses.orpo_loss(avg_c, avg_r, beta=m.beta)
            loss = loss - avg_c  # + NLL of the chosen answer
        metrics = {k: v.detach().float().sum() for k, v in metrics.items()}
        metrics["logps/chosen"] = chosen.detach().sum()
        metrics["logps/rejected"] = rejected.detach().sum()
        return LossTerms(loss_sum=loss.sum(), weight=half, metrics=metrics)


def with_reference(batch: dict, examples: list[dict]) -> dict:
    """Add the examples' precomputed reference log-probs ([B, 2]: first half, second half);
    without them for every example the objective runs the reference on this batch."""
    if all("ref_logps" in e for e in examples):
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
    return batch


def reference_cache_key(model_id: str, examples: list[dict]) -> str:
    """Same model (id, dtype, quantization) and same token ids (so same data and
    tokenisation): same cached values, across runs and sweep jobs."""
    digest = hashlib.sha256(model_id.encode())
    for e in examples:
        digest.update(repr(sorted((k, v) for k, v in e.items() if k.endswith("_ids"))).encode())
    return digest.hexdigest()[:24]
