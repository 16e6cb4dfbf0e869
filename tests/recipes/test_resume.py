"""Kill a run after a checkpoint, resume it, and get the uninterrupted loss curve."""

from __future__ import annotations

import pytest

from polmctl.engine.trainer import Trainer

pytestmark = pytest.mark.recipes

ARGS = [
    "trainer.max_steps=6",
    "trainer.save_every=2",
    "trainer.micro_batch_size=2",
    "data.max_rows=40",
    "trainer.lr=1e-2",
]


class Killed(Exception):
    pass


@pytest.mark.parametrize("recipe", ["lora", "sft"])
def test_resumed_run_matches_the_uninterrupted_curve(train_recipe, tmp_path, monkeypatch, recipe):
    whole = train_recipe(recipe, *ARGS, run_dir=tmp_path / "whole")

    step = Trainer._train_step

    def dies_after_step_5(self):
        if self.step == 5:  # step 5 was logged, but the last checkpoint is step-4
            raise Killed()
        return step(self)

    monkeypatch.setattr(Trainer, "_train_step", dies_after_step_5)
    with pytest.raises(Killed):
        train_recipe(recipe, *ARGS, run_dir=tmp_path / "broken")
    monkeypatch.setattr(Trainer, "_train_step", step)

    resumed = train_recipe(recipe, *ARGS, "resume=auto", run_dir=tmp_path / "broken")
    assert resumed.summary["resumed_from"].endswith("step-4")
    assert len(resumed.losses) == 6
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-7)
    for (name, p), (_, q) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert bool((p == q).all()) or float((p - q).abs().max()) < 1e-6, name
