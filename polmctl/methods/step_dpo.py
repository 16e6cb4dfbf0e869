"""Step-DPO (Lai et al. 2024): DPO on the first wrong step of a solution. Chosen and rejected
share the prompt and the correct steps before it, and differ from that step on: the correct
step against the wrong one.

    polmctl run recipe=step_dpo
    polmctl run recipe=step_dpo method.beta=0.4 data.source=math_step_dpo.jsonl

Features and the flag that controls each:
  the DPO loss and its variants   method.loss: sigmoid (Step-DPO's) | ipo | robust | hinge, method.beta,
                                  method.label_smoothing (every key of recipe=dpo's method)
  reference log-probs, once       method.precompute_ref_logps (default true; cached on disk)
  step pairs                      data=arithmetic_step_pairs (builtin: the first wrong step of the
                                  step-labelled arithmetic solutions) | data.source=<{prompt, prefix,
                                  chosen, rejected} rows> (Math-Step-DPO-10K's initial_reason_steps is read as prefix)

The loss is DPO's, unchanged (Step-DPO's trainer only changes how rows are tokenized): this
module is the Step-DPO schema and that tokenization (polmctl/data/steps.py: the prefix goes
with the prompt, so the log-probs and the loss cover the two differing steps only) around
``PairwiseObjective`` of polmctl/methods/preference.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from polmctl.config.schema import option
from polmctl.data.steps import encode_step_pairs
from polmctl.methods.preference import DPOMethod, PairwiseObjective


@dataclass
class StepDPOMethod(DPOMethod):
    name: str = option("step_dpo", "step_dpo: DPO on the first wrong step, after the correct steps before it")


class StepDPOObjective(PairwiseObjective):
    """DPO's step on pairs of single steps that follow a shared prefix."""

    def __init__(self, method: StepDPOMethod):
        # PairwiseObjective runs the DPO loss for a method named dpo: hand it DPO's keys, as set here.
        super().__init__(DPOMethod(**{f.name: getattr(method, f.name) for f in fields(DPOMethod) if f.name != "name"}))

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        self.pad_token_id = tokenizer.pad_token_id
        return encode_step_pairs(
            rows,
            tokenizer,
            source=data.source,
            max_length=data.max_length,
            overlong=data.overlong,
            bad_rows=data.bad_rows,
        )
