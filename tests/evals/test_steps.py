"""The prm eval task on a fake PRM whose step scores are written in the steps: step accuracy over
steps, first-error accuracy over solutions (a correct solution's first error is none)."""

from __future__ import annotations

import pytest

from polmctl.evals.steps import first_error, prm_accuracy
from polmctl.models.tiny import build_tiny_tokenizer
from tests.rollout.test_process_reward import DigitPRM

pytestmark = pytest.mark.unit


def test_first_error():
    assert first_error([True, False, False]) == 1
    assert first_error([True, True]) is None and first_error([]) is None
    assert first_error([False, True]) == 0


def test_step_and_first_error_accuracy():
    tokenizer = build_tiny_tokenizer()
    rows = [  # a step ending in digit d scores d / 10; above 0.5 counts as predicted right
        {"prompt": "a", "completions": ["s 9", "s 8", "s 7"], "labels": [True, True, True]},  # 3/3, none = none
        {"prompt": "b", "completions": ["s 9", "s 2", "s 1"], "labels": [True, False, False]},  # 3/3, 1 = 1
        {"prompt": "c", "completions": ["s 9", "s 9", "s 2"], "labels": [True, False, False]},  # 2/3, 2 != 1
        {"prompt": "d", "completions": ["s 5", "s 9"], "labels": [True, True]},  # 1/2 (0.5 is not right), 0 != none
    ]
    result = prm_accuracy(DigitPRM(tokenizer, separator=";"), tokenizer, rows, batch_size=3)
    assert result["metrics"] == pytest.approx(
        {"step_accuracy": 9 / 11, "first_error_accuracy": 2 / 4, "n": 4, "steps": 11}
    )
    third = result["samples"][2]
    assert third["steps"] == rows[2]["completions"] and third["labels"] == [True, False, False]
    assert third["scores"] == pytest.approx([0.9, 0.9, 0.2]) and (
        third["first_error"],
        third["predicted_first_error"],
    ) == (1, 2)
