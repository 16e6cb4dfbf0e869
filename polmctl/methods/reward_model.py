"""Reward modelling: a scalar score head on a causal LM, trained with the Bradley-Terry loss
on paired preferences, so that score(prompt, chosen) > score(prompt, rejected).

    polmctl run recipe=reward_model
    polmctl run recipe=reward_model method.center_coefficient=0.01 data.source=prefs.jsonl
    polmctl eval outputs/reward_model/2026-11-25/10-00-00      # held-out pairwise accuracy

Features and the flag that controls each:
  required gap per pair           a ``margin`` column in the data (loss: -logsig(c - r - margin))
  rewards centred on zero         method.center_coefficient (TRL's center_rewards_coefficient)
  LoRA or full fine-tuning        peft=lora (the score head always trains) | peft=none
The model is ``AutoModelForSequenceClassification`` with one label; its own pooling (the
last non-pad token of each row) gives the score, so ``final/`` scores text exactly as it
did in training when loaded with ``from_pretrained``. The loss is in polmctl/losses/reward.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polmctl.config.schema import option, positive
from polmctl.data.preference import encode_preference_rows, preference_collate
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import DataError
from polmctl.losses.reward import bradley_terry_loss
from polmctl.models.forward import pair_scores


@dataclass
class RewardMethod:
    name: str = option("reward_model", "reward_model: Bradley-Terry loss on a scalar score head")
    center_coefficient: float = option(0.0, "weight of (score_chosen + score_rejected)^2, keeps rewards near 0")

    def check(self, section: str) -> None:
        positive(section, "center_coefficient", self.center_coefficient, zero_ok=True)


class RewardObjective(Objective):
    """Batches of B chosen rows followed by their B rejected rows; the weight is B pairs."""

    model_head = "reward"  # the train runner loads AutoModelForSequenceClassification(num_labels=1)

    def __init__(self, method: RewardMethod, pad_token_id: int = 0):
        self.method, self.pad_token_id = method, pad_token_id

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id = tokenizer.pad_token_id
        examples, stats = encode_preference_rows(rows, tokenizer, data, recipe="reward_model")
        with_margin = sum("margin" in e for e in examples)
        if 0 < with_margin < len(examples):
            first = next(i for i, e in enumerate(examples) if "margin" not in e)
            raise DataError(
                f"{data.source}: {len(examples) - with_margin} kept rows have no margin (first: kept row "
                f"{first}); give every row a margin or drop the column"
            )
        return examples, stats

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = preference_collate(examples, self.pad_token_id)
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in examples])
        return batch

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].size(0) // 2

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        chosen, rejected = pair_scores(model, batch)
        margin = batch["margin"].to(chosen) if "margin" in batch else None
        loss, metrics = bradley_terry_loss(
            chosen, rejected, margin=margin, center_coefficient=self.method.center_coefficient
        )
        logged = {
            "accuracy": metrics["accuracy"].sum(),
            "margin": metrics["margin"].sum(),
            "rewards/chosen": chosen.detach().sum(),
            "rewards/rejected": rejected.detach().sum(),
        }
        return LossTerms(loss_sum=loss.sum(), weight=chosen.size(0), metrics=logged)
