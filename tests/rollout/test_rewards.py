"""Reward functions for online RL: answer extraction, format and length rewards, the registry
and _target_ resolution, weighted combination with strict checks, and the reward-model scorer."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from polmctl.errors import RewardError
from polmctl.rollout.rewards import (
    REWARD_FUNCTIONS,
    CombinedReward,
    RewardModelScorer,
    final_answer,
    format_reward,
    length_penalty,
    math_answer,
    resolve_reward,
)

pytestmark = pytest.mark.unit


def my_reward(prompts, completions, **_):
    """A user reward for the _target_ tests: the number of 'a's in each completion."""
    return [float(c.count("a")) for c in completions]


class Scaled:
    """A user reward class for the _target_ tests, built from the spec's keys."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, prompts, completions, **_):
        return [self.factor * len(c) for c in completions]


def score(completion, truth):
    return math_answer(["q"], [completion], answer=[truth])[0]


# --- math_answer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, truth",
    [
        ("3 + 4 = 7, then 7 * 2 = 14. <answer>14</answer> Checked 3 times.", "14"),  # the tag beats later numbers
        ("<answer>1</answer> no wait <answer>2</answer>", "2"),  # the last tag
        (r"So the result is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{3} was wrong, it is \boxed{4}", "4"),  # the last box
        (r"<answer>\boxed{12}</answer>", "12"),  # a box inside the tag
        ("The answer is 1,200.", 1200),  # int ground truth
        ("She has 1,200 coins", "1,200"),
        ("The answer is 19.0", 19),
        ("<answer>19.0</answer>", "19"),
        ("<answer>19.</answer>", 19.0),
        ("The answer is 0.50", "0.5"),
        ("It drops to -3 degrees.", "-3"),
        ("<answer> -3 </answer>", -3),
        ("<answer>Paris</answer>", "Paris"),
        (r"\boxed{x + 1}", "x + 1"),
        ("The answer is 12, not 15.", 12),  # "answer is" beats the last number
    ],
)
def test_math_answer_matches(completion, truth):
    assert score(completion, truth) == 1.0


@pytest.mark.parametrize(
    "completion, truth",
    [
        ("I do not know.", "7"),  # no number at all
        ("", "7"),
        ("<answer>14</answer> but really 15", "15"),  # the tag wins even if a later number is right
        ("The answer is 3", "-3"),  # sign matters
        ("5-3 is 2", "-3"),  # "5-3" is 5 and 3, not -3
        ("<answer>paris</answer>", "Paris"),  # text compares exactly
        ("<answer>The answer is 19.</answer>", "19"),  # a tag holds the bare answer
        (r"\boxed{12", "12"),  # an unclosed box falls through to the last number...
    ],
)
def test_math_answer_rejects(completion, truth):
    expected = 1.0 if completion == r"\boxed{12" else 0.0  # ...which here is right
    assert score(completion, truth) == expected


def test_final_answer_and_batch_alignment():
    assert final_answer(r"\boxed{\sqrt{\frac{a}{b}}} done") == r"\sqrt{\frac{a}{b}}"
    assert final_answer("nothing here") is None
    assert math_answer(
        ["a", "b", "c"], ["The answer is 2", "<answer>5</answer>", "x"], answer=["2", 6, "x"], other=[1, 2, 3]
    ) == [1.0, 0.0, 0.0]


# --- format and length ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>2+2 is 4</think><answer>4</answer>", 1.0),
        ("<think>\nstep 1\nstep 2\n</think>\n\n<answer>\n4\n</answer>\n", 1.0),
        ("<think></think> <answer></answer>", 1.0),
        ("<answer>4</answer>", 0.0),  # no thinking
        ("<think>hm</think>", 0.0),  # no answer
        ("<answer>4</answer><think>hm</think>", 0.0),  # wrong order
        ("Sure! <think>hm</think><answer>4</answer>", 0.0),  # text before
        ("<think>hm</think><answer>4</answer> Hope that helps", 0.0),  # text after
        ("<think>hm</think><answer>4</answer><answer>5</answer>", 0.0),  # two answers
        ("<think>a</think><think>b</think><answer>4</answer>", 0.0),  # two think blocks
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(["q"], [completion]) == [expected]


def test_length_penalty_values():
    completions = ["x" * n for n in (0, 100, 150, 200, 300)]
    assert length_penalty([""] * 5, completions, target=100) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert length_penalty([""], ["x" * 250]) == [-0.25]  # default target 200
    with pytest.raises(ValueError, match="target must be a positive"):
        length_penalty([""], ["x"], target=0)


# --- registry and resolution ----------------------------------------------------------------


def test_registry_names_resolve_to_the_functions():
    assert set(REWARD_FUNCTIONS) == {"math_answer", "format", "length_penalty"}
    assert resolve_reward("format") == ("format", format_reward)
    assert resolve_reward({"name": "math_answer", "weight": 2}) == ("math_answer", math_answer)


def test_kwargs_are_bound_and_dictconfig_specs_work():
    name, fn = resolve_reward(OmegaConf.create({"name": "length_penalty", "weight": 0.5, "kwargs": {"target": 10}}))
    assert name == "length_penalty"
    assert fn([""], ["x" * 15]) == [-0.5]


def test_target_resolves_a_function_a_class_and_a_dotpath_in_the_package():
    assert resolve_reward({"_target_": f"{__name__}.my_reward"}) == ("my_reward", my_reward)
    name, fn = resolve_reward({"_target_": f"{__name__}.Scaled", "name": "scaled", "factor": 2})
    assert name == "scaled" and fn(["p"], ["abc"]) == [6]
    name, fn = resolve_reward({"_target_": "polmctl.rollout.rewards.length_penalty", "kwargs": {"target": 4}})
    assert name == "length_penalty" and fn([""], ["x" * 6]) == [-0.5]


def test_resolution_errors_say_what_to_do():
    with pytest.raises(
        ValueError,
        match=r"unknown reward 'acuracy'; known rewards: format, length_penalty, "
        r"math_answer, prm, reward_model; .*_target_: package.module.function",
    ):
        resolve_reward("acuracy")
    with pytest.raises(ValueError, match=r"'length_penalty' takes no build arguments \(target\); .*under kwargs:"):
        resolve_reward({"name": "length_penalty", "target": 100})
    with pytest.raises(
        ValueError,
        match=r"cannot build reward 'length_penalty' as length_penalty\(target=100\).*"
        r"under kwargs:",
    ):
        resolve_reward({"_target_": "polmctl.rollout.rewards.length_penalty", "target": 100})
    with pytest.raises(ValueError, match=r"_target_: 'polmctl.no_such_module.fn' cannot be imported"):
        resolve_reward({"_target_": "polmctl.no_such_module.fn"})
    with pytest.raises(ValueError, match="needs name or _target_"):
        resolve_reward({"weight": 1})
    with pytest.raises(ValueError, match="registry name or a mapping"):
        resolve_reward(3)


# --- combining ------------------------------------------------------------------------------


def test_weights_combine_and_raw_values_are_kept():
    combined = CombinedReward.from_specs(
        [
            "math_answer",
            {"name": "format", "weight": 0.5},
            {"name": "length_penalty", "weight": 2.0, "kwargs": {"target": 40}},
        ]
    )
    completions = ["<think>easy</think><answer>4</answer>", "The answer is 5" + "!" * 45]
    total, per_function = combined(["2+2?", "2+3?"], completions, {"answer": ["4", "5"]}, batch_index=0)
    assert list(per_function) == ["math_answer", "format", "length_penalty"]
    assert per_function["math_answer"].tolist() == [1.0, 1.0]
    assert per_function["format"].tolist() == [1.0, 0.0]
    assert per_function["length_penalty"].tolist() == pytest.approx([0.0, -0.5])
    assert total.tolist() == pytest.approx([1.0 + 0.5, 1.0 - 1.0])
    assert total.dtype == torch.float32 and total.shape == (2,)


def test_combined_reward_rejects_bad_configs():
    with pytest.raises(ValueError, match="format appears more than once"):
        CombinedReward.from_specs(["format", {"name": "format", "weight": 2}])
    with pytest.raises(ValueError, match="weight must be a finite number, got 'high'"):
        CombinedReward.from_specs([{"name": "format", "weight": "high"}])
    with pytest.raises(ValueError, match="no reward functions"):
        CombinedReward([])


def broken(prompts, completions, **_):
    raise RuntimeError("no such thing\nsecond line")


@pytest.mark.parametrize(
    "fn, message",
    [
        (broken, r"^reward 'bad' on batch 7 raised RuntimeError: no such thing$"),
        (lambda p, c, **_: [1.0] * (len(c) - 1), r"^reward 'bad' on batch 7 returned 1 values for 2 completions$"),
        (
            lambda p, c, **_: [1.0, float("nan")],
            r"^reward 'bad' on batch 7 returned nan at index 1; rewards must be finite$",
        ),
        (lambda p, c, **_: [math.inf, 0.0], r"^reward 'bad' on batch 7 returned inf at index 0"),
        (lambda p, c, **_: [1.0, "1.0"], r"^reward 'bad' on batch 7 returned a non-number at index 1: str '1.0'$"),
        (lambda p, c, **_: [1.0, None], r"returned a non-number at index 1: NoneType None"),
        (lambda p, c, **_: 1.0, r"^reward 'bad' on batch 7 returned a float, not a list of numbers$"),
        (lambda p, c, **_: "11", r"returned a str, not a list of numbers"),
        (
            lambda p, c, answer: [1.0, 1.0],
            r"^reward 'bad' on batch 7 needs the column 'answer', which the data lacks "
            r"\(columns: difficulty\)$",
        ),
        (math_answer, r"^reward 'bad' on batch 7 needs the column 'answer'"),
    ],
)
def test_reward_errors_name_the_function_and_the_batch(fn, message):
    combined = CombinedReward([("ok", format_reward, 1.0), ("bad", fn, 1.0)])
    with pytest.raises(RewardError, match=message) as info:
        combined(["p", "q"], ["a", "b"], {"difficulty": [1, 2]}, batch_index=7)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_tensor_and_numpy_like_results_are_accepted():
    combined = CombinedReward([("t", lambda p, c, **_: torch.tensor([1, 2]), 0.5)])
    total, per_function = combined(["p", "q"], ["a", "b"])
    assert per_function["t"].tolist() == [1.0, 2.0] and total.tolist() == [0.5, 1.0]


# --- reward model scorer ------------------------------------------------------------------


@pytest.fixture()
def reward_model_dir(tmp_path):
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, head="reward", pad_token_id=tok.pad_token_id)
    return save_model(model, tok, tmp_path / "rm")


PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "Great question! Let me think. It is 4, I believe."},
    {"prompt": "Sort: pear, apple", "chosen": "apple, pear", "rejected": "pear, apple"},
    {"prompt": "Which is larger, 7 or 9?", "chosen": "9 is larger.", "rejected": "7"},
]


def test_scorer_scores_like_the_reward_eval_and_training(reward_model_dir):
    from polmctl.config.schema import ModelConfig
    from polmctl.evals.reward import reward_accuracy
    from polmctl.models import load_model, load_tokenizer

    scorer = RewardModelScorer(str(reward_model_dir), batch_size=2)
    prompts = [p["prompt"] for p in PAIRS] * 2
    completions = [p["chosen"] for p in PAIRS] + [p["rejected"] for p in PAIRS]
    scores = scorer(prompts, completions, answer=["unused"] * 6)
    assert len(scores) == 6 and all(isinstance(s, float) for s in scores)

    cfg = ModelConfig(name_or_path=str(reward_model_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, for_training=False, pad_token_id=tok.pad_token_id)
    samples = reward_accuracy(model, tok, PAIRS, batch_size=3)["samples"]
    assert scores[:3] == pytest.approx([s["chosen_score"] for s in samples], abs=1e-5)
    assert scores[3:] == pytest.approx([s["rejected_score"] for s in samples], abs=1e-5)
    assert len(set(scores)) > 1  # a real, input-dependent score, not a constant

    # One unpadded row, built by hand the way training builds it.
    from polmctl.data.formats import format_completion, format_prompt

    text = format_prompt(PAIRS[0]["prompt"], tok) + format_completion(PAIRS[0]["prompt"], PAIRS[0]["chosen"], tok)
    assert text.endswith("4.<|im_end|>\n")
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        direct = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item()
    assert scores[0] == pytest.approx(direct, abs=1e-5)

    # Deterministic, and independent of how rows are batched.
    assert scorer(prompts, completions) == scores
    assert RewardModelScorer(str(reward_model_dir), batch_size=5)(prompts, completions) == pytest.approx(
        scores, abs=1e-5
    )


def test_reward_model_resolves_from_the_registry_and_combines(reward_model_dir):
    name, fn = resolve_reward({"name": "reward_model", "path": str(reward_model_dir), "batch_size": 4})
    assert name == "reward_model" and isinstance(fn, RewardModelScorer) and fn.batch_size == 4
    combined = CombinedReward.from_specs([{"name": "reward_model", "path": str(reward_model_dir), "weight": 2.0}])
    total, per_function = combined(["hi"], ["hello"], {"answer": ["x"]})
    assert total.tolist() == pytest.approx([2 * fn(["hi"], ["hello"])[0]], abs=1e-5)


def test_scorer_refuses_a_causal_lm(tmp_path):
    from polmctl.errors import ModelError
    from polmctl.models.tiny import write_tiny

    write_tiny(tmp_path / "lm")
    with pytest.raises(ModelError, match="holds a causal LM, not a reward model"):
        RewardModelScorer(str(tmp_path / "lm"))
