"""recipe=dpo with each pairwise loss added after DPO (method.loss) on model=tiny, on a repeated
batch: the weights change, the loss falls and the chosen answer pulls ahead of the rejected one. Each
loss alone: the recipe's NLL term (method.sft_weight) is off."""

from __future__ import annotations

import pytest

from polmctl.engine.metrics import read_metrics
from tests.recipes.test_alignment_recipes import REPEATED_BATCH

pytestmark = pytest.mark.recipes
# SPPO's squared errors pull with 2 (h - 1/(2 beta)) = -10 per answer at the start: at 1e-2 LoRA overshoots.
LR = {"sppo_hard": "trainer.lr=2e-3"}


@pytest.mark.parametrize("loss", ["bco_pair", "apo_zero", "apo_down", "exo_pair", "nca_pair", "sppo_hard"])
def test_dpo_loss_trains_and_separates_the_pairs(train_recipe, loss):
    run = train_recipe(
        "dpo",
        f"method.loss={loss}",
        "method.label_smoothing=1e-3",
        "method.sft_weight=0",
        LR.get(loss, "trainer.lr=1e-2"),
        *REPEATED_BATCH,
    )
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")
    losses = [l["loss"] for l in lines]
    assert losses[-1] < losses[0] - 0.01, losses
    assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert lines[-1]["rewards/margins"] > 0.05, [l["rewards/margins"] for l in lines]
    if loss == "apo_down":  # lowers both answers, the rejected one more
        assert lines[-1]["rewards/chosen"] < 0
