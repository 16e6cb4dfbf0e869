"""Online DPO's mechanics on the tiny model with a fixed sampler: which answers become the pair
(the judge's best over its worst, TRL's rule on ties, the missing-EOS penalty), skipped ties and
the refill, the reference log-probs carried by each batch, the verifiable-answer metrics, and the
config checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.errors import ConfigError, TrainingError
from polmctl.losses import IGNORE_INDEX
from polmctl.methods.online_dpo import OnlineDPOBatches, OnlineDPOMethod, OnlineDPOObjective, pick_pairs, second_model
from polmctl.models import load_model, load_tokenizer
from polmctl.rollout.rewards import math_answer

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
NAN = float("nan")
# TRL's worked example (refs: OnlineDPOTrainer), grouped by prompt: p0 -> [0.3, 0.5], p1 -> [0.9, 0.1]
TRL_REWARDS = {"p0 one": 0.3, "p0 two": 0.5, "p1 one": 0.9, "p1 two": 0.1}


def table_reward(prompts, completions, **_):
    return [TRL_REWARDS[c] for c in completions]


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


class FixedSampler:
    """A generation backend that returns the next of ``calls`` (texts, one per completion); an
    answer ending in '+' is returned without its EOS token (cut off), the '+' dropped."""

    def __init__(self, *calls: list[str]):
        self.calls = list(calls)

    def sample(self, model, tokenizer, prompts, k, options):
        texts = self.calls.pop(0)
        assert len(texts) == len(prompts) * k
        return [
            tokenizer(t.rstrip("+"), add_special_tokens=False)["input_ids"]
            + ([] if t.endswith("+") else [tokenizer.eos_token_id])
            for t in texts
        ]


def make_source(rows, *calls, pairs_per_step=2, reward=table_reward, **method):
    tok, model = load_tokenizer(TINY), load_model(TINY)
    m = OnlineDPOMethod(rewards=[{"_target_": f"{__name__}.{reward.__name__}"}], **method)
    objective = OnlineDPOObjective(m)
    objective.reference.freeze(model)
    cfg = SimpleNamespace(
        trainer=SimpleNamespace(micro_batch_size=pairs_per_step, grad_accum=1),
        seed=0,
        data=SimpleNamespace(shuffle=False),
        model=TINY,
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    source = OnlineDPOBatches(rows, objective=objective, tokenizer=tok, cfg=cfg, accelerator=accelerator)
    source.backend = FixedSampler(*calls)
    return source, objective, model, tok


def answers(batch, tok) -> list[str]:
    labels = batch["labels"]
    return [tok.decode([t for t in row.tolist() if t != IGNORE_INDEX], skip_special_tokens=True) for row in labels]


def test_pick_pairs_takes_the_first_best_over_the_last_worst():
    scores = torch.tensor([1, 3, 3, 0, 2, 2, 2, 2, NAN, 5, NAN, NAN, 0, NAN, 1, 1], dtype=torch.float32)
    pairs, counts = pick_pairs(scores, 4, skip_ties=True)
    assert pairs == [(0, 1, 3), (3, 14, 12)]  # group 1 tied, group 2 has one scored answer
    assert counts == {"tied_groups": 1.0, "skipped_groups": 2.0}
    pairs, counts = pick_pairs(scores, 4, skip_ties=False)
    assert pairs == [(0, 1, 3), (1, 4, 7), (3, 14, 12)] and counts["skipped_groups"] == 1
    # k = 2 and a tie: the first sample is chosen, as TRL's `first >= second`
    assert pick_pairs(torch.tensor([0.5, 0.5]), 2, skip_ties=False)[0] == [(0, 0, 1)]


def test_the_judges_best_over_worst_with_trls_missing_eos_penalty():
    """TRL's worked example: p1's first answer is cut off (no EOS), 0.9 - 1.0 = -0.1 < 0.1, so
    both prompts choose their second answer."""
    rows = [{"prompt": "p0"}, {"prompt": "p1"}]
    source, objective, model, tok = make_source(
        rows, ["p0 one", "p0 two", "p1 one+", "p1 two"], missing_eos_penalty=1.0
    )
    batches, metrics = source.next_step(model)
    assert len(batches) == 1
    assert answers(batches[0], tok) == ["p0 two", "p1 two", "p0 one", "p1 one"]  # chosen rows, then rejected
    assert metrics["judge/chosen_score"] == pytest.approx((0.5 + 0.1) / 2)
    assert metrics["judge/rejected_score"] == pytest.approx((0.3 - 0.1) / 2)
    assert metrics["frac_ended_with_eos"] == 0.75 and metrics["pairs"] == 2 and metrics["tied_groups"] == 0
    assert metrics["rewards/table_reward"] == pytest.approx(sum(TRL_REWARDS.values()) / 4)  # before the penalty
    # The batch carries the reference's log-probs: before any update they are the policy's, so DPO starts at ln 2.
    assert batches[0]["ref_logps"].shape == (2, 2)
    terms = objective(model, batches[0])
    assert (terms.loss_sum / terms.weight).item() == pytest.approx(math.log(2), abs=1e-5)


def test_tied_prompts_are_skipped_and_the_step_refills_from_the_next_prompts():
    rows = [{"prompt": f"q{i}"} for i in range(4)]
    calls = (["ab", "cd", "a", "abc"], ["x", "xyz", "long one", "no"])
    source, _, model, tok = make_source(rows, *calls, reward=length_reward)
    batches, metrics = source.next_step(model)
    assert answers(batches[0], tok) == ["abc", "xyz", "a", "x"]  # q0 tied (2 = 2), q3's pair left over
    assert metrics["tied_groups"] == 1 and metrics["skipped_groups"] == 1 and metrics["groups"] == 4
    assert metrics["pairs"] == 2 and source.rollouts == 2 and source.state_dict()["rollouts"] == 2


def test_ties_kept_when_asked_and_a_step_without_pairs_stops_clearly():
    rows = [{"prompt": f"q{i}"} for i in range(2)]
    source, _, model, tok = make_source(rows, ["ab", "cd", "ef", "gh"], reward=length_reward, skip_ties=False)
    batches, metrics = source.next_step(model)
    assert answers(batches[0], tok) == ["ab", "ef", "cd", "gh"] and metrics["tied_groups"] == 2

    calls = (["ab", "cd", "ef", "gh"], ["a", "b", "c", "d"])
    source, _, model, _ = make_source(rows, *calls, reward=length_reward, max_resamples=2)
    with pytest.raises(TrainingError, match=r"2 rollouts of 2 prompts gave no pair .*4 prompts' answers all scored"):
        source.next_step(model)


def right_answer(prompts, completions, answer, **_):
    return math_answer(prompts, completions, answer)


@pytest.mark.parametrize("judge,agreement", [(length_reward, 0.0), (right_answer, 1.0)])
def test_agreement_with_the_verifiable_answer(judge, agreement):
    rows = [{"prompt": "2 + 3?", "answer": "5"}, {"prompt": "3 + 4?", "answer": "7"}]
    source, _, model, _ = make_source(rows, ["5", "It is 4", "It is 3", "7"], reward=judge)
    _, metrics = source.next_step(model)
    assert metrics["verifiable/accuracy"] == 0.5
    assert metrics["judge/agreement"] == agreement  # the longer answer is the wrong one in both pairs
    assert metrics["verifiable/chosen_correct"] == agreement and metrics["verifiable/rejected_correct"] == 1 - agreement


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"num_generations": 1}, "method.num_generations"),
        ({"judge": "vote"}, "method.judge"),
        ({"rewards": []}, "method.rewards"),
        ({"judge": "reward_model"}, "method.judge_model"),  # the default judge_model is a causal LM
        ({"judge": "llm", "judge_template": "{prompt} {answer}"}, "method.judge_template"),
        ({"judge": "llm", "judge_mode": "score", "judge_min_label_prob": 0.0}, "method.judge_min_label_prob"),
        ({"judge": "llm", "missing_eos_penalty": 1.0}, "method.missing_eos_penalty"),  # pairwise: no scores
        ({"judge": "llm", "judge_position": "first"}, "method.judge_position"),
        ({"loss": "kto"}, "method.loss"),
        ({"label_smoothing": 0.5}, "method.label_smoothing"),
        ({"max_resamples": 0}, "method.max_resamples"),
    ],
)
def test_bad_settings_fail_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as err:
        OnlineDPOMethod(**changes).check("method")
    assert err.value.key == key


def test_a_score_judge_takes_the_missing_eos_penalty_and_every_judge_model():
    OnlineDPOMethod(judge="llm", judge_mode="score", missing_eos_penalty=1.0).check("method")
    for model in ("policy", "reference", "builtin:tiny"):
        OnlineDPOMethod(judge="llm", judge_model=model).check("method")


@pytest.mark.parametrize(
    "changes,why",
    [
        ({"judge_swap": False}, "asks in one order (judge_swap=false)"),
        ({"judge_mode": "score"}, "scores one answer at a time (judge_mode=score)"),
        ({}, None),  # pairwise, both orders: the two orders are averaged
        ({"judge_swap": False, "judge_position": "agree"}, None),  # the default: nothing was asked for
    ],
)
def test_an_average_position_the_judge_cannot_apply_is_a_warning(capsys, changes, why):
    method = OnlineDPOMethod(**{"judge": "llm", "judge_position": "average", **changes})
    method.check("method")  # not an error: recipe=rlaif's variants inherit its average
    err = capsys.readouterr().err
    if why is None:
        assert "judge_position" not in err
        return
    assert err.count("\n") == 1 and err.startswith("warning: method.judge_position=average is unused: ")
    assert why in err and "set method.judge_position=agree to silence this" in err


def test_the_second_model_a_run_holds():
    def run(peft: str, **method):
        return SimpleNamespace(method=OnlineDPOMethod(**method), peft=SimpleNamespace(method=peft), model=TINY)

    what, cfg = second_model(run("lora", judge="llm", judge_model="builtin:tiny"))
    assert what == "judge builtin:tiny" and cfg.name_or_path == "builtin:tiny"
    assert second_model(run("none", judge="llm", judge_model="reference")) == ("frozen reference copy", None)
    assert second_model(run("lora", judge="llm", judge_model="policy")) is None
    assert second_model(run("lora")) is None  # reward functions, adapters off for the reference
    what, cfg = second_model(run("none", judge="reward_model", judge_model="outputs/rm"))
    assert what.startswith("judge outputs/rm (+ a frozen reference copy") and cfg.name_or_path == "outputs/rm"


def test_encode_refuses_rows_a_reward_cannot_score_before_the_model_loads():
    from polmctl.errors import DataError

    objective = OnlineDPOObjective(OnlineDPOMethod(rewards=["math_answer"]))
    data = SimpleNamespace(source="prompts.jsonl")
    rows = [{"prompt": "1+1=?"}, {"prompt": "2+2=?"}]
    with pytest.raises(DataError, match=r"prompts.jsonl: reward 'math_answer' .* reads the column 'answer'"):
        objective.encode(rows, None, data)
    kept, stats = objective.encode([{"prompt": "1+1=?", "answer": "2"}], None, data)
    assert len(kept) == 1 and "prompt" in stats.summary()
    judged = OnlineDPOObjective(OnlineDPOMethod(judge="llm", judge_model="reference", rewards=["math_answer"]))
    assert len(judged.encode(rows, None, data)[0]) == 2  # an LLM judge reads no column
