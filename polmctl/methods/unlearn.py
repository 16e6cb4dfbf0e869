"""Unlearning: forget a forget-set while keeping a retain-set (rows marked by a ``role`` column).

    polmctl run recipe=unlearn                                     # NPO + retain NLL on builtin:facts
    polmctl run recipe=unlearn method.loss=simnpo method.beta=2.5 method.forget_weight=0.1375
    polmctl run recipe=unlearn method.loss=gradient_ascent method.retain=kl

Features and the flag that controls each:
  forget term                     method.loss: gradient_ascent | npo (Zhang et al., 2024) | simnpo (Fan et al., 2024)
  its scale / SimNPO's margin     method.beta, method.gamma
  retain term                     method.retain: none | nll (NPO-RT, GradDiff) | kl (NPO-KL: KL to the reference)
  the two terms' weights          method.forget_weight, method.retain_weight
  which rows are which            the data's ``role`` column: forget | retain
                                  (builtin:facts: data.options.forget_topics)
  facts the model really knows    data.options.known_by (builtin:facts; the recipe: the model being trained)
  reference log-probs, once       method.precompute_ref_logps (NPO; cached on disk like DPO's)

An example is a forget row and a retain row, one forward pass for both: an epoch visits every row of
the larger set once, the smaller set's rows cycling beside them (retain=none: the forget rows alone).
The loss of an example is forget_weight x the forget term + retain_weight x the retain term, averaged
over examples. Only answers are trained (data.completion_only_loss is not read, as in DPO). The
retain NLL is each answer's token mean; the KL is KL(pi_ref || pi) summed over the vocabulary,
averaged over the answer's positions. The reference (methods/reference.py) is the policy
with its adapters off, or a frozen copy; the losses are in polmctl/losses/unlearn.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import one_of, option, positive
from polmctl.data import encode_dataset
from polmctl.data.preference import pad_sequences
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import DataError
from polmctl.losses import IGNORE_INDEX
from polmctl.losses import unlearn as losses
from polmctl.methods.reference import Reference, cached_logps
from polmctl.models.forward import labelled_logits, sequence_logps

RETAIN_TERMS = ("none", "nll", "kl")


@dataclass
class UnlearnMethod:
    name: str = option("unlearn", "unlearn: lower the forget-set's likelihood, keep the retain-set")
    loss: str = option("npo", "forget term: gradient_ascent | npo (against the reference) | simnpo (reference-free)")
    beta: float = option(0.1, "NPO / SimNPO inverse temperature (NPO's paper: 0.1; SimNPO's TOFU config: 2.5)")
    gamma: float = option(0.0, "SimNPO's margin on the per-token NLL, as its code (the paper's gamma is beta x this)")
    retain: str = option("nll", "retain term: none | nll (cross-entropy on retain answers) | kl (KL to the reference)")
    forget_weight: float = option(1.0, "weight of the forget term (SimNPO's TOFU config: 0.1375)")
    retain_weight: float = option(1.0, "weight of the retain term")
    precompute_ref_logps: bool = option(True, "npo: score the forget rows with the reference once (cached)")

    def check(self, section: str) -> None:
        one_of(section, "loss", self.loss, losses.FORGET_LOSSES)
        one_of(section, "retain", self.retain, RETAIN_TERMS)
        positive(section, "beta", self.beta)
        positive(section, "gamma", self.gamma, zero_ok=True)
        positive(section, "forget_weight", self.forget_weight)
        positive(section, "retain_weight", self.retain_weight, zero_ok=True)

    @property
    def needs_reference(self) -> bool:
        return self.loss == "npo" or self.retain == "kl"

    @property
    def live_reference(self) -> bool:
        """Whether the reference runs during training (the KL needs its full distributions)."""
        return self.retain == "kl" or (self.loss == "npo" and not self.precompute_ref_logps)


@dataclass
class UnlearnStats:
    forget: Any  # EncodeStats of the forget rows
    retain: Any  # of the retain rows (None with retain=none)
    examples: int

    @property
    def tokens(self) -> int:
        return self.forget.tokens + (self.retain.tokens if self.retain else 0)

    @property
    def truncated(self) -> int:
        return self.forget.truncated + (self.retain.truncated if self.retain else 0)

    def summary(self) -> str:
        text = f"forget {self.forget.summary()}"
        if self.retain is not None:
            text += f"; retain {self.retain.summary()}"
        return f"{text}; {self.examples} examples an epoch"


class UnlearnObjective(Objective):
    """Batches of B forget rows, then (retain != none) B retain rows."""

    def __init__(self, method: UnlearnMethod):
        self.method, self.pad_token_id = method, 0
        self.reference = Reference()

    # -- data ------------------------------------------------------------------------------
    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], UnlearnStats]:
        self.pad_token_id = tokenizer.pad_token_id
        by_role = split_roles(rows, data.source)
        if self.method.retain != "none" and not by_role["retain"]:
            raise DataError(
                f"{data.source}: no row has role 'retain', but method.retain={self.method.retain}; "
                "add retain rows or set method.retain=none"
            )
        encoded, stats = {}, {}
        for role in ("forget", "retain") if self.method.retain != "none" else ("forget",):
            encoded[role], stats[role] = encode_dataset(
                by_role[role],
                tokenizer,
                source=f"{data.source} ({role} rows)",
                fmt=data.format,
                max_length=data.max_length,
                overlong=data.overlong,
                completion_only_loss=True,  # the answers are what is forgotten or kept, as DPO's
            )
            encoded[role] = [split_answer(e, f"{data.source}: a {role} row") for e in encoded[role]]
        forget, retain = encoded["forget"], encoded.get("retain")
        count = max(len(forget), len(retain)) if retain else len(forget)
        examples = []
        for i in range(count):
            example = dict(forget[i % len(forget)])
            if retain:
                r = retain[i % len(retain)]
                example.update(retain_prompt_ids=r["prompt_ids"], retain_completion_ids=r["completion_ids"])
            examples.append(example)
        return examples, UnlearnStats(stats["forget"], stats.get("retain"), count)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [(e["prompt_ids"], e["completion_ids"]) for e in examples]
        if self.method.retain != "none":
            pairs += [(e["retain_prompt_ids"], e["retain_completion_ids"]) for e in examples]
        batch = labelled_answers(pairs, self.pad_token_id)
        if all("ref_logps" in e for e in examples):
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples])
        return batch

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].size(0) // (1 if self.method.retain == "none" else 2)

    # -- reference -------------------------------------------------------------------------
    def prepare(
        self, model: torch.nn.Module, examples: list[dict], *, device: torch.device, model_id: str, cache_dir: Path
    ) -> str:
        m = self.method
        if not m.needs_reference:
            return "no reference model (reference-free unlearning)"
        notes = [self.reference.freeze(model)] if m.live_reference else []
        if m.loss == "npo" and m.precompute_ref_logps:
            notes.append(self._precompute(model, examples, device=device, model_id=model_id, cache_dir=cache_dir))
        return "; ".join(notes)

    def _precompute(self, model, examples: list[dict], *, device, model_id: str, cache_dir: Path) -> str:
        """The reference's summed log-prob of every visited forget answer, from the cache or one pass."""

        def compute(chunk: list[dict]) -> torch.Tensor:
            values = []
            for i in range(0, len(chunk), 8):
                pairs = [(e["prompt_ids"], e["completion_ids"]) for e in chunk[i : i + 8]]
                batch = {k: v.to(device) for k, v in labelled_answers(pairs, self.pad_token_id).items()}
                values.append(self.reference.run(model, lambda ref: sequence_logps(ref, batch)[0], at_start=True).cpu())
            return torch.cat(values).unsqueeze(1)

        values, note = cached_logps(cache_dir, model_id, examples, compute, "forget rows")
        for e, value in zip(examples, values[:, 0].tolist()):
            e["ref_logps"] = value
        return note

    # -- the step --------------------------------------------------------------------------
    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        m, B = self.method, self.weight(batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        head = labelled_logits(model, inputs, batch["labels"])
        logits = head.logits.float()
        picked = logits.gather(-1, head.targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        logps, lengths = head.on_window(picked).sum(-1), head.mask.sum(-1)
        forget_logps, forget_n = logps[:B], lengths[:B]

        if m.loss == "gradient_ascent":
            forget = losses.gradient_ascent_loss(forget_logps / forget_n.clamp(min=1))
        elif m.loss == "simnpo":
            forget = losses.simnpo_loss(forget_logps, forget_n, beta=m.beta, gamma=m.gamma)
        else:
            forget = losses.npo_loss(forget_logps, self._forget_ref_logps(model, batch, B).to(logps), beta=m.beta)
        loss = m.forget_weight * forget
        metrics = {
            "forget/loss": forget.detach().sum(),
            "forget/nll": (-forget_logps.detach() / forget_n.clamp(min=1)).sum(),
            "forget/logps": forget_logps.detach().sum(),
        }
        if m.retain != "none":
            retain_n = lengths[B:].clamp(min=1)
            metrics["retain/nll"] = (-logps[B:].detach() / retain_n).sum()
            if m.retain == "nll":
                retain = -logps[B:] / retain_n
            else:
                kl = losses.retain_kl(logits[int(head.mask[:B].sum()) :], self._retain_ref_logits(model, batch, B))
                rows = torch.repeat_interleave(torch.arange(B, device=kl.device), lengths[B:])
                retain = torch.zeros(B, device=kl.device, dtype=kl.dtype).index_add(0, rows, kl) / retain_n
                metrics["retain/kl"] = retain.detach().sum()
            loss = loss + m.retain_weight * retain
        return LossTerms(loss_sum=loss.sum(), weight=B, metrics=metrics)

    def _forget_ref_logps(self, model, batch: dict, B: int) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        part = {k: batch[k][:B] for k in ("input_ids", "attention_mask", "labels")}
        return self.reference.run(model, lambda ref: sequence_logps(ref, part)[0])

    def _retain_ref_logits(self, model, batch: dict, B: int) -> torch.Tensor:
        """The reference's logits at the retain answers' positions, in the policy's order (row-major)."""
        inputs = {k: batch[k][B:] for k in ("input_ids", "attention_mask")}
        return self.reference.run(model, lambda ref: labelled_logits(ref, inputs, batch["labels"][B:]).logits.float())


def split_answer(example: dict, where: str) -> dict:
    """An encoded row ({input_ids, labels}, labels on the answer) -> {prompt_ids, completion_ids}."""
    labels = example["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None:
        raise DataError(f"{where} has no answer token left; raise data.max_length")
    if any(label == IGNORE_INDEX for label in labels[start:]):
        raise DataError(
            f"{where} has answer tokens in more than one place (a conversation with several assistant "
            "turns); unlearning rows are {prompt, completion, role} or end in their only assistant turn"
        )
    return {"prompt_ids": example["input_ids"][:start], "completion_ids": example["input_ids"][start:]}


def labelled_answers(pairs: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, answer ids) pairs -> one right-padded batch, labels on the answers only."""
    return pad_sequences([p + c for p, c in pairs], [[IGNORE_INDEX] * len(p) + c for p, c in pairs], pad_token_id)


def split_roles(rows: list[dict], source: str) -> dict[str, list[dict]]:
    """Rows by their ``role`` column (forget | retain); a missing or other value names the row."""
    by_role: dict[str, list[dict]] = {"forget": [], "retain": []}
    for i, row in enumerate(rows):
        role = row.get("role")
        if role not in by_role:
            state = "has no 'role' column" if "role" not in row else f"has role {role!r}"
            raise DataError(
                f"{source}: row {i} {state}; unlearning needs each row marked 'forget' or 'retain' "
                "(builtin:facts marks them by data.options.forget_topics)"
            )
        by_role[role].append(row)
    if not by_role["forget"]:
        raise DataError(f"{source}: no row has role 'forget'; there is nothing to unlearn")
    return by_role
