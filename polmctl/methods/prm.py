"""Process reward model (PRM): a correct/wrong label for every step of a solution, from a
two-label token-classification head on the LM, trained on step-labelled rows (Uesato et al.
2022; Lightman et al. 2023; Math-Shepherd, Wang et al. 2024; TRL's PRMTrainer).

    polmctl run recipe=prm
    polmctl run recipe=prm data.source=math_shepherd.jsonl "method.step_separator='\n\n'"
    polmctl eval outputs/prm/2026-12-03/10-00-00          # held-out step and first-error accuracy
    polmctl run recipe=rejection_sampling "method.rewards=[{name: prm, path: outputs/prm/2026-12-03/10-00-00}]"

Features and the flag that controls each:
  where a step's label sits       method.step_separator (after every step; the label is on its last token)
  outcome supervision only        method.train_on_last_step_only (TRL's option: the last step's label)
  LoRA or full fine-tuning        peft=lora (the score head always trains) | peft=none
  long rows                       data.max_length, data.overlong (truncate: the late steps lose their labels)
  step-labelled data              data=arithmetic_steps (builtin, checked steps) | data.source=<file of TRL's PRM rows>

The model is ``AutoModelForTokenClassification`` with two labels (wrong, correct), as TRL's
PRMTrainer trains it, rather than the LM's own logits at the separator (e.g. for "+" / "-"):
``final/`` then loads with ``from_pretrained`` (and ``pipeline("token-classification")``) exactly
as a TRL PRM does, a PRM dir says what it is in its config (so the prm reward, the prm eval
task and ``polmctl eval`` recognise it, and nothing mistakes it for a policy), and a step's score
is a plain two-way softmax on a head of 2 x hidden weights. What it costs: the head starts
untrained where the LM-logit variant starts from the LM's prior on the two tokens; LoRA and the
head learn it within tens of steps. The classifier's dropout is off, as TRL's
``disable_dropout``. The loss is in polmctl/losses/process.py, the tokenization in
polmctl/data/steps.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polmctl.config.schema import option
from polmctl.data.preference import pad_sequences
from polmctl.data.steps import encode_step_rows
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError
from polmctl.losses import IGNORE_INDEX
from polmctl.losses.process import step_label_loss


@dataclass
class PRMMethod:
    name: str = option("prm", "prm: a process reward model, a correct/wrong label per step (token classification)")
    step_separator: str = option("\n", "text after every step; the step's label sits on its last token (TRL's default)")
    train_on_last_step_only: bool = option(
        False, "train on the last step's label only (TRL's option); evaluation still scores every step"
    )

    def check(self, section: str) -> None:
        if not self.step_separator:
            raise ConfigError(f"{section}.step_separator", "is empty; the step labels sit on it: use e.g. '\\n'")


class PRMObjective(Objective):
    """Padded rows with a label (0 / 1) on each step's separator token; the weight is the labelled steps."""

    model_head = "prm"  # the train runner loads AutoModelForTokenClassification(num_labels=2)

    def __init__(self, method: PRMMethod):
        self.method, self.pad_token_id = method, 0

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id = tokenizer.pad_token_id
        return encode_step_rows(
            rows,
            tokenizer,
            source=data.source,
            separator=self.method.step_separator,
            max_length=data.max_length,
            overlong=data.overlong,
            bad_rows=data.bad_rows,
            last_step_only=self.method.train_on_last_step_only,
        )

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_sequences([e["input_ids"] for e in examples], [e["labels"] for e in examples], self.pad_token_id)

    def weight(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labelled = batch["labels"] != IGNORE_INDEX
        losses, metrics = step_label_loss(logits[labelled], batch["labels"][labelled])
        return LossTerms(loss_sum=losses.sum(), weight=losses.numel(), metrics={"accuracy": metrics["accuracy"].sum()})

    def prepare(
        self, model: torch.nn.Module, examples: list[dict], *, device: torch.device, model_id: str, cache_dir: Path
    ) -> str:
        """Record the separator in the model's config (final/config.json: polmctl eval and the prm
        reward split steps at it) and switch the classifier's dropout off. Called after the
        "before" evaluation, which so scores the starting model at the separator it records (a
        fresh head: the default), as that model is."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.step_separator = self.method.step_separator
        if isinstance(getattr(base, "dropout", None), torch.nn.Dropout):
            base.dropout.p = 0.0
        return f"step labels on the last token of method.step_separator={self.method.step_separator!r}"
