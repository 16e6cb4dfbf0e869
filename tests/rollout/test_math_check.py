r"""math_answer on competition-math answers: LaTeX, fractions, roots, intervals, sets, equations,
\boxed{} and text, through math-verify; plain numbers stay on the fast number path.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/rollout/test_math_check.py
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from polmctl.rollout.math_check import uncheckable
from polmctl.rollout.rewards import answer_text, math_answer

pytestmark = pytest.mark.unit


def score(completion: str, truth) -> float:
    return math_answer([""], [completion], answer=[truth])[0]


# (a model's completion, the dataset's reference answer), each of which scored 0 before math-verify
RIGHT = [
    (r"Each toss is heads with probability $\frac12$, so the answer is $\frac{1}{4}$.", r"\frac{1}{4}"),
    ("Two of the four outcomes work. The answer is 1/2.", r"\frac{1}{2}"),
    ("The answer is 1/2", "0.5"),
    (r"So the probability is $\boxed{0.25}$.", r"\dfrac{1}{4}"),
    (r"$\sqrt{50} = \sqrt{25 \cdot 2} = \boxed{5\sqrt{2}}$", r"5\sqrt2"),
    (r"Rationalising, the answer is $\frac{\sqrt{2}}{2}$.", r"\frac{1}{\sqrt{2}}"),
    (r"The quadratic is negative between its roots: $\boxed{(1, 2)}$.", "(1,2)"),
    (r"We need $x - 3 \ge 0$, so the domain is $\boxed{[3, \infty)}$.", r"[3,\infty)"),
    (r"So $x \in \boxed{\{1, 0, -1\}}$.", "-1, 0, 1"),
    (r"The answer is $x = 4$.", "4"),
    (r"Expanding, we get \boxed{x^2 + 2x + 1}", "(x+1)^2"),
    (r"<answer>\frac{7}{2}</answer>", "3.5"),
    ("E comes before M, so the answer is Evelyn.", r"\text{Evelyn}"),
    (r"The answer is $\boxed{\text{(C)}}$.", r"\text{(C)}"),
    (r"The area is $\boxed{16\pi}$ square units.", r"16\pi"),
]
WRONG = [
    ("The answer is 2.", r"\frac{1}{2}"),  # \frac{1}{2} read as its last number was 2
    (r"Hence $\boxed{(1, 2]}$.", "[1,2)"),  # an interval's ends matter
    (r"\boxed{3\sqrt{2}}", r"2\sqrt{3}"),
    (r"So $x \in \boxed{\{0, 1\}}$.", "-1, 0, 1"),
    (r"The answer is $\frac{3}{8}$.", r"\frac{1}{4}"),
    ("The answer is Mark.", r"\text{Evelyn}"),
    ("I could not solve it.", r"\frac{1}{4}"),
]


@pytest.mark.parametrize("completion, truth", RIGHT)
def test_equivalent_answers_score_one(completion, truth):
    assert score(completion, truth) == 1.0


@pytest.mark.parametrize("completion, truth", WRONG)
def test_different_answers_score_zero(completion, truth):
    assert score(completion, truth) == 0.0


def test_answer_text_keeps_the_whole_stated_answer():
    assert answer_text("so the answer is 1/2. Done") == "1/2"
    assert answer_text(r"The answer is $\frac{1}{2}$.") == r"$\frac{1}{2}$"
    assert answer_text("The answer is 0.5.") == "0.5"  # a decimal point is not the sentence's end
    assert answer_text(r"...\boxed{x = 3} and then") == "x = 3"
    assert answer_text("nothing stated, just 12") is None


def test_plain_numbers_never_reach_math_verify(monkeypatch):
    """builtin:arithmetic's answers are integers: scored as before, without sympy."""
    import polmctl.rollout.math_check as mc

    monkeypatch.setattr(mc, "parse_math", lambda text: pytest.fail(f"math-verify called on {text!r}"))
    completions = ["12 + 7 = 19. The answer is 19.", "The answer is 18.", "It is 20", "no idea", "<answer>19</answer>"]
    assert math_answer([""] * 5, completions, answer=[19, 19, 19, "19", "19"])[:3] == [1.0, 0.0, 0.0]
    started = time.perf_counter()
    math_answer([""] * 2000, ["The answer is 18."] * 2000, answer=["19"] * 2000)
    assert time.perf_counter() - started < 1.0


def test_works_off_the_main_thread():
    """math-verify's own timeouts use SIGALRM, which only the main thread may set."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(score, [c for c, _ in RIGHT[:4]], [t for _, t in RIGHT[:4]]))
    assert results == [1.0] * 4


@pytest.mark.parametrize(
    "answer, why",
    [
        (r"\frac{1}{4}", None),
        ("1,200", None),
        (42, None),
        (r"[3,\infty)", None),
        (r"\text{Evelyn}", None),
        ("Paris", None),
        ("", "is empty"),
        (None, "is empty"),
        (
            "Natalia sold 48/2 = <<48/2=24>>24 clips in May. Altogether she sold 48+24 = <<48+24=72>>72 clips. #### 72",
            "is a sentence or a worked solution",
        ),
        (r"\frac{", "does not parse as math"),
        (["4"], "is a list"),
    ],
)
def test_uncheckable_reference_answers(answer, why):
    found = uncheckable(answer)
    assert (found is None) if why is None else (found is not None and found.startswith(why))
