"""recipe=unlearn end to end on model=tiny (builtin:facts without the known-facts check: a random
model knows none): the weights change, the forget answers' likelihood falls while the retain
answers' NLL stays bounded, for each forget loss and retain term."""

from __future__ import annotations

import math

import pytest

from polmctl.engine.metrics import read_metrics

pytestmark = pytest.mark.recipes

TINY_FACTS = [
    "data.options.known_by=null",
    "trainer.micro_batch_size=8",
    "trainer.max_steps=15",
    "trainer.lr=3e-3",
    "trainer.scheduler=constant",
    "peft.dropout=0",
]


@pytest.mark.parametrize(
    "loss, retain",
    [("npo", "nll"), ("simnpo", "nll"), ("gradient_ascent", "nll"), ("npo", "kl"), ("simnpo", "none")],
)
def test_unlearning_lowers_the_forget_set_and_holds_the_retain_set(train_recipe, loss, retain):
    # The random model's per-token NLL is ~5.6 (ln 260): at SimNPO's beta 2.5 its sigmoid saturates
    # (weight 2 sig(-14) ~ 2e-6) and the retain term alone would train; beta 0.1 keeps it in range.
    run = train_recipe("unlearn", *TINY_FACTS, f"method.loss={loss}", f"method.retain={retain}", "method.beta=0.1")
    assert run.unchanged_parameters() == []
    lines = read_metrics(run.dir / "metrics.jsonl")

    def rise(key: str) -> float:  # the last three steps' mean against the first (batches differ each step)
        values = [l[key] for l in lines]
        return sum(values[-3:]) / 3 - values[0]

    assert rise("forget/nll") > 0.25, [l["forget/nll"] for l in lines]  # the forget answers' NLL rises
    if retain == "none":
        assert "retain/nll" not in lines[0]
    else:  # the retain answers' NLL stays within bounds, well below the forget set's rise
        assert rise("retain/nll") < min(0.5, rise("forget/nll") - 0.15), [l["retain/nll"] for l in lines]
    if loss == "npo":  # the policy starts as the reference: (2 / beta) ln 2
        assert lines[0]["forget/loss"] == pytest.approx(20 * math.log(2), rel=1e-4)
    if retain == "kl":
        assert lines[0]["retain/kl"] == pytest.approx(0.0, abs=1e-5) and lines[-1]["retain/kl"] > 0


def test_unlearn_runs_its_eval_tasks_before_and_after(train_recipe):
    run = train_recipe(
        "unlearn",
        *TINY_FACTS,
        "eval.tasks=[forget,retain]",
        "eval.before=true",
        "eval.max_samples=60",
        "eval.max_new_tokens=8",
    )
    before, after = run.summary["eval"]["before"], run.summary["eval"]["after"]
    for task in ("forget", "retain"):
        assert before[task]["n"] == after[task]["n"] > 0 and 0 <= after[task]["accuracy"] <= 1
        assert after[task]["perplexity"] == pytest.approx(math.exp(after[task]["nll"]))
    # evaluated on the trained facts (data.eval_split=train): the forget answers got less likely
    assert after["forget"]["nll"] > before["forget"]["nll"] + 0.2
    assert (run.dir / "eval" / "forget-after.jsonl").exists()
