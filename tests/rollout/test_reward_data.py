r"""The online methods' data checks before the model loads: every column a reward reads, and
reference answers math_answer can check (and reference solutions it agrees with).

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/rollout/test_reward_data.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from polmctl.data.prompts import prompt_rows
from polmctl.errors import DataError
from polmctl.methods.grpo import GRPOMethod, GRPOObjective
from polmctl.methods.ppo import PPOMethod, PPOObjective
from polmctl.methods.rejection_sampling import RejectionSamplingMethod, RejectionSamplingObjective
from polmctl.rollout.reward_data import check_reward_data, reward_columns

pytestmark = pytest.mark.unit

# Competition-style rows: a prompt, the final answer, and the worked solution ending in it.
MATH_ROWS = [
    {
        "prompt": "A fair coin is tossed twice. What is the probability of two heads? Express your answer as a "
        "common fraction.",
        "answer": r"\frac{1}{4}",
        "solution": r"Each toss is heads with probability $\frac12$, so the probability is "
        r"$\left(\frac12\right)^2 = \boxed{\frac{1}{4}}$.",
    },
    {
        "prompt": r"Simplify $\sqrt{50}$.",
        "answer": r"5\sqrt{2}",
        "solution": r"$\sqrt{50} = \sqrt{25\cdot 2} = \boxed{5\sqrt{2}}$.",
    },
    {
        "prompt": "For which $x$ is $x^2 - 3x + 2 < 0$? Express your answer in interval notation.",
        "answer": "(1,2)",
        "solution": r"It factors as $(x-1)(x-2)$, which is negative between its roots: $\boxed{(1,2)}$.",
    },
    {
        "prompt": "Find all real $x$ with $x^3 = x$. Enter all the solutions, separated by commas.",
        "answer": "-1, 0, 1",
        "solution": r"$x^3 - x = x(x-1)(x+1)$, so $x = \boxed{-1, 0, 1}$.",
    },
    {
        "prompt": "Evelyn ran 3 miles and Mark ran 2. Who ran farther?",
        "answer": r"\text{Evelyn}",
        "solution": r"Since $3 > 2$, the answer is $\boxed{\text{Evelyn}}$.",
    },
    {
        "prompt": r"What is $\dfrac{3}{4}$ of 60?",
        "answer": "45",
        "solution": r"$\frac{3}{4}\cdot 60 = 45$. The answer is 45.",
    },
]


def check(rows, rewards):
    return check_reward_data(rows, rewards, "data.jsonl", prompt_rows(rows, "data.jsonl")[1])


def needs_difficulty(prompts, completions, difficulty, **_):
    return [float(d) for d in difficulty]


class Graded:
    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, prompts, completions, answer, grade, **_):
        return [self.scale] * len(completions)


def test_a_missing_column_names_the_reward_the_column_and_what_the_data_has():
    rows = [{"prompt": "2+2?", "target": "4", "source": "quiz"}] * 3
    with pytest.raises(DataError) as info:
        check(rows, [{"name": "format", "weight": 0.1}, "math_answer"])
    message = str(info.value)
    assert message == (
        "data.jsonl: reward 'math_answer' (method.rewards[1]) reads the column 'answer', which the data lacks "
        "(columns: target, source); add it, or use another reward"
    )


def test_target_rewards_declare_their_required_keyword_parameters():
    rows = [{"prompt": "p", "answer": "1"}]
    with pytest.raises(
        DataError, match=r"reward 'needs_difficulty' \(method.rewards\[0\]\) reads the column 'difficulty'"
    ):
        check(rows, [{"_target_": f"{__name__}.needs_difficulty"}])
    check(rows, [{"_target_": f"{__name__}.needs_difficulty", "kwargs": {"difficulty": [1]}}])  # bound: not a column
    with pytest.raises(DataError, match=r"reward 'graded' \(method.rewards\[0\]\) reads the column 'grade'"):
        check(rows, [{"_target_": f"{__name__}.Graded", "name": "graded", "scale": 2.0}])


def test_a_row_without_the_column_is_named():
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c"}]
    with pytest.raises(DataError, match=r"row 2 lacks the column 'answer' that reward 'math_answer' reads \(1 of 3"):
        check(rows, ["math_answer"])


def test_a_reward_model_is_not_loaded_to_learn_its_columns(tmp_path):
    name, columns, _ = reward_columns({"name": "reward_model", "path": str(tmp_path / "absent")}, "method.rewards[0]")
    assert (name, columns) == ("reward_model", ())


def test_most_answers_uncheckable_stops_naming_the_first():
    rows = [
        {
            "prompt": f"q{i}",
            "answer": f"She sold {i} clips in May and {i * 2} in June, {i * 3} altogether. #### {i * 3}",
        }
        for i in range(3)
    ] + [{"prompt": "q", "answer": "4"}]
    with pytest.raises(DataError) as info:
        check(rows, ["math_answer"])
    message = str(info.value)
    assert message.startswith("data.jsonl: math_answer cannot check 3 of 4 reference answers (first: row 0, column")
    assert "is a sentence or a worked solution" in message and "what follows ####" in message


def test_a_few_uncheckable_answers_are_reported_not_fatal():
    rows = [dict(r) for r in MATH_ROWS[:3]] + [{"prompt": "x", "answer": ""}]
    summary = check(rows, ["math_answer"]).summary()
    assert summary.startswith(
        "4 prompts; 3/4 reference answers checkable (row 3: '' is empty; such rows always score 0)"
    )


def test_reference_solutions_are_scored_against_their_answers():
    summary = check(MATH_ROWS, ["math_answer", {"name": "format", "weight": 0.2}]).summary()
    assert summary == "6 prompts; 6/6 reference answers checkable; reference solutions (solution) score 6/6"


def test_solutions_that_disagree_with_their_answers_stop_the_run():
    """The answer column shifted by one row: every solution contradicts its row's answer."""
    shifted = [{**row, "answer": MATH_ROWS[i - 1]["answer"]} for i, row in enumerate(MATH_ROWS)]
    with pytest.raises(
        DataError, match=r"math_answer scores 6 of 6 reference solutions \(column 'solution'\) as wrong"
    ):
        check(shifted, ["math_answer"])


@pytest.mark.parametrize(
    "objective",
    [
        GRPOObjective(GRPOMethod()),
        PPOObjective(PPOMethod()),
        RejectionSamplingObjective(RejectionSamplingMethod()),
    ],
)
def test_every_online_method_checks_in_encode(objective, tiny_tokenizer):
    data = SimpleNamespace(source="data.jsonl")
    examples, stats = objective.encode(MATH_ROWS, tiny_tokenizer, data)
    assert len(examples) == 6 and "reference solutions (solution) score 6/6" in stats.summary()
    with pytest.raises(DataError, match="reads the column 'answer', which the data lacks"):
        objective.encode([{"prompt": r["prompt"]} for r in MATH_ROWS], tiny_tokenizer, data)
