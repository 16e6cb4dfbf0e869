"""recipe=online_dpo, recipe=rlaif and recipe=self_rewarding end to end on model=tiny: weights
change, the loss starts at ln 2 (policy = reference) and moves, stays finite; with a reward the
tiny model can learn (the share of the letter "a") the loss falls and the reward rises; the tiny
model as an LLM judge (random but deterministic judgments) in both modes and as each round's judge."""

from __future__ import annotations

import math

import pytest

from polmctl.compose import compose_config
from polmctl.engine.metrics import read_metrics
from polmctl.runners.pipeline import plan_stages, run_pipeline
from polmctl.validate import validate

pytestmark = pytest.mark.recipes

STEPS = [
    "method.top_k=50",  # the random model's likeliest tokens: a letter is common enough to learn
    "method.max_new_tokens=16",
    "trainer.lr=3e-3",
    "trainer.scheduler=constant",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=1",
    "peft.dropout=0",
]


def letter_a(prompts, completions, **_):
    return [c.count("a") / max(len(c), 1) for c in completions]


def check_trained(run) -> list[dict]:
    lines = read_metrics(run.dir / "metrics.jsonl")
    losses = [l["loss"] for l in lines]
    assert run.unchanged_parameters() == []
    assert all(math.isfinite(x) for x in losses) and losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert len(set(losses)) > 1, losses
    assert all(l["pairs"] == 4 for l in lines)
    return lines


def test_online_dpo_prefers_what_the_judge_scores_higher(train_recipe):
    run = train_recipe(
        "online_dpo",
        f"method.rewards=[{{_target_: {__name__}.letter_a}}]",
        "method.num_generations=4",
        "trainer.max_steps=12",
        *STEPS,
    )
    lines = check_trained(run)
    losses = [l["loss"] for l in lines]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.03, losses
    rewards = [l["rewards/letter_a"] for l in lines]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.01, rewards
    assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and lines[-1]["rewards/margins"] > 0
    for key in ("judge/chosen_score", "judge/margin", "tied_groups", "skipped_groups", "verifiable/accuracy"):
        assert key in lines[0], key
    assert all(l["judge/chosen_score"] > l["judge/rejected_score"] for l in lines)  # ties are skipped


@pytest.mark.parametrize(
    "judge",
    [
        ["method.judge_model=policy", "method.judge_swap=false"],
        ["method.judge_model=policy", "method.judge_position=average"],
        [
            "method.judge_model=builtin:tiny",
            "method.judge_mode=score",
            "method.judge_min_label_prob=1e-6",  # the random model rarely starts a reply with a digit
            "method.num_generations=3",
        ],
    ],
    ids=["pairwise-policy", "pairwise-average-policy", "score-separate-model"],
)
def test_rlaif_trains_on_an_llm_judges_pairs(train_recipe, judge):
    run = train_recipe("rlaif", "trainer.max_steps=4", *STEPS, *judge)
    lines = check_trained(run)
    key = "judge/unparseable" if "method.judge_mode=score" in judge else "judge/inconsistent"
    if "method.judge_position=average" in judge:  # inconsistent comparisons are decided too: no skipped group
        assert all(l["judge/comparisons"] > 0 and l["skipped_groups"] == 0 for l in lines)
    else:
        assert all(l[key] == 0 for l in lines)
    assert all(0 < l["judge/label_mass"] < 1 for l in lines)
    assert all(l["judge/margin"] > 0 and "verifiable/chosen_correct" in l for l in lines)


def test_rlaif_warns_only_where_its_average_position_is_unused(tmp_path, capsys):
    validate(compose_config(["recipe=rlaif", "model=tiny"]))
    assert "judge_position" not in capsys.readouterr().err
    for unused in ("method.judge_swap=false", "method.judge_mode=score"):
        validate(compose_config(["recipe=rlaif", "model=tiny", unused]))
        assert "warning: method.judge_position=average is unused" in capsys.readouterr().err, unused
    # recipe=self_rewarding's rounds are rlaif in score mode: they set agree, so planning them says nothing.
    plan_stages(validate(compose_config(["recipe=self_rewarding", "model=tiny", f"output_dir={tmp_path}"])))
    assert "judge_position" not in capsys.readouterr().err


def test_self_rewarding_rounds_each_start_from_the_last_and_judge_with_it(tmp_path):
    cfg = validate(
        compose_config(
            [
                "recipe=self_rewarding",
                "model=tiny",
                f"output_dir={tmp_path}",
                "method.common=['trainer.max_steps=1','eval.tasks=[]','logger.progress=false',"
                "'method.judge_min_label_prob=1e-6','method.max_new_tokens=8','trainer.micro_batch_size=2',"
                "'trainer.grad_accum=1']",
            ]
        )
    )
    plan = plan_stages(cfg)
    assert [p.name for p in plan] == ["round1", "round2", "round3"]
    assert [p.model for p in plan[1:]] == [str(tmp_path / "1-round1" / "final"), str(tmp_path / "2-round2" / "final")]
    assert all("method.judge_model=reference" in p.overrides for p in plan)
    summary = run_pipeline(cfg)
    assert summary["status"] == "completed" and [s["status"] for s in summary["stages"]] == ["completed"] * 3
    for name in ("1-round1", "2-round2", "3-round3"):
        (line,) = read_metrics(tmp_path / name / "metrics.jsonl")
        assert math.isfinite(line["loss"]) and line["pairs"] == 2
