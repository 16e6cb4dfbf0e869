"""The LLM judge: rubric templates, label probabilities (a label that another continues), the score
reading (expected score, unparseable replies), pairwise verdicts and position swapping against an
order-biased fake judge, and the tiny model as a real, deterministic judge."""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.config.schema import ModelConfig
from polmctl.data import format_prompt
from polmctl.models import load_model, load_tokenizer
from polmctl.rollout.judges import (
    DEFAULT_TEMPLATES,
    SCORE_LABELS,
    LLMJudge,
    copeland_scores,
    label_probabilities,
    pairwise_verdicts,
    read_scores,
    template_problem,
)

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")


def no_model(fn):
    return fn(None)


class FakeJudge(LLMJudge):
    """Reads answers A and B back out of each rendered query ('{prompt}|{answer_a}|{answer_b}') and
    returns the label probabilities ``prefer(a, b)`` gives; no model runs."""

    def __init__(self, tokenizer, prefer, **kwargs):
        super().__init__(tokenizer, mode="pairwise", template="{prompt}|{answer_a}|{answer_b}", **kwargs)
        self.prefer, self.queries = prefer, 0

    def probabilities(self, run, queries):
        self.queries += len(queries)
        rows = []
        for query in queries:
            _, a, b = query.split("user\n", 1)[1].split("<|im_end|>", 1)[0].split("|")
            rows.append(self.prefer(a, b))
        return torch.tensor(rows)


def always_a(a, b):
    return [0.9, 0.1]  # position bias: whatever is shown first wins


def longer(a, b):
    return [0.8, 0.2] if len(a) > len(b) else [0.2, 0.8]


@pytest.mark.parametrize(
    "template,mode,problem",
    [
        (DEFAULT_TEMPLATES["pairwise"], "pairwise", None),
        (DEFAULT_TEMPLATES["score"], "score", None),
        ("{prompt} {answer}", "pairwise", "unknown fields ['answer']"),
        ("{prompt} {answer_a}", "pairwise", "lacks the fields ['answer_b']"),
        ("{prompt} {answer", "score", "not a format string"),
    ],
)
def test_template_problem_names_what_is_wrong(template, mode, problem):
    found = template_problem(template, mode)
    assert found is None if problem is None else problem in found


def test_label_probabilities_split_a_label_from_the_label_that_continues_it():
    """Digits are single tokens here, so "10" continues "1": P("1") must exclude replies going on to
    "10", and the labels together hold exactly the probability of a first token 1..9."""
    tok, model = load_tokenizer(TINY), load_model(TINY, for_training=False)
    query = format_prompt("Rate it", tok)
    probs = label_probabilities(model, tok, [query, query + "x"], SCORE_LABELS, batch_size=1)
    ids = tok(query, add_special_tokens=False)["input_ids"]
    digit = {d: tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)}
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
        after_one = model(torch.tensor([ids + [digit[1]]])).logits[0, -1].softmax(-1)
    p1, p10 = first[digit[1]].item(), first[digit[1]].item() * after_one[digit[0]].item()
    assert probs[0, 9].item() == pytest.approx(p10, rel=1e-4)  # "10"
    assert probs[0, 0].item() == pytest.approx(p1 - p10, rel=1e-4)  # "1", not followed by "0"
    assert probs[0, 4].item() == pytest.approx(first[digit[5]].item(), rel=1e-4)  # "5"
    assert probs[0].sum().item() == pytest.approx(sum(first[digit[d]].item() for d in range(1, 10)), rel=1e-4)
    assert not torch.allclose(probs[0], probs[1])  # each query scored on its own


def test_read_scores_expected_score_and_unparseable_replies():
    probs = torch.zeros(3, 10)
    probs[0, 6], probs[0, 8] = 0.3, 0.3  # 7 and 9, equally likely, 0.6 of the mass: 8
    probs[1, 0] = 0.6  # 1
    probs[2, 9] = 0.2  # "10", but more likely a reply that is no score at all
    scores = read_scores(probs, min_label_prob=0.5)
    assert scores[:2].tolist() == pytest.approx([8.0, 1.0]) and math.isnan(scores[2])
    assert read_scores(probs, min_label_prob=0.1)[2].item() == pytest.approx(10.0)


def test_pairwise_verdicts_keep_only_what_both_orders_agree_on():
    first = torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    swapped = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.7, 0.3], [0.5, 0.5]])
    verdicts, inconsistent = pairwise_verdicts(first, swapped)
    assert verdicts.tolist() == [1, 0, -1, 0]  # i wins; follows the position; j wins; a true tie
    assert inconsistent.tolist() == [False, True, False, False]
    alone, none = pairwise_verdicts(first, None)
    assert alone.tolist() == [1, 1, -1, 0] and not none.any()
    # average (balanced position calibration): mean of P(i better) over both orders against 1/2.
    # Row 2: 0.7 and 0.2 -> 0.45, j wins where "agree" had a tie; row 4: 0.5 -> a tie.
    averaged, flagged = pairwise_verdicts(first, swapped, "average")
    assert averaged.tolist() == [1, -1, -1, 0] and flagged.tolist() == inconsistent.tolist()
    # A judge that says "A" at 0.9 in every order, nudged by the answer: 0.95/0.85 for i -> (0.95 + 0.15) / 2 > 1/2.
    biased_first, biased_swapped = torch.tensor([[0.95, 0.05]]), torch.tensor([[0.85, 0.15]])
    assert pairwise_verdicts(biased_first, biased_swapped)[0].tolist() == [0]
    assert pairwise_verdicts(biased_first, biased_swapped, "average")[0].tolist() == [1]
    # 0 beats 1, ties with 2, 1 beats 2: wins plus half the ties
    assert copeland_scores(3, [(0, 1), (0, 2), (1, 2)], torch.tensor([1.0, 0.0, 1.0])).tolist() == [1.5, 1.0, 0.5]


def test_position_swapping_catches_an_order_biased_judge(tiny_tokenizer):
    answers = ["a", "bbb", "cc", "dddd"]
    biased = FakeJudge(tiny_tokenizer, always_a)
    scores, stats = biased.judge(no_model, ["q"], answers, 4)
    assert stats["judge/comparisons"] == 6 and stats["judge/inconsistent"] == 6
    assert scores.tolist() == [1.5] * 4  # every comparison a tie: no answer is better
    unswapped, stats = FakeJudge(tiny_tokenizer, always_a, swap=False).judge(no_model, ["q"], answers, 4)
    assert unswapped.tolist() == [3.0, 2.0, 1.0, 0.0] and stats["judge/inconsistent"] == 0  # position wins

    fair = FakeJudge(tiny_tokenizer, longer)
    scores, stats = fair.judge(no_model, ["q"], answers, 4)
    assert stats["judge/inconsistent"] == 0 and fair.queries == 12  # 6 pairs, both orders
    assert scores.tolist() == [0.0, 2.0, 1.0, 3.0]  # ranked by length, whatever the order shown


def test_identical_answers_tie_without_asking(tiny_tokenizer):
    judge = FakeJudge(tiny_tokenizer, always_a)
    scores, stats = judge.judge(no_model, ["q", "r"], ["same", "same", "x", "y"], 2)
    assert judge.queries == 2 and stats["judge/comparisons"] == 1  # only r's pair, in both orders
    assert scores.tolist() == [0.5, 0.5, 0.5, 0.5]


def test_the_tiny_model_judges_deterministically_through_its_chat_template():
    tok, model = load_tokenizer(TINY), load_model(TINY, for_training=False)

    def run(fn):
        return fn(model)

    answers = ["12 + 7 = 19.", "The answer is 5.", "19", ""]
    judge = LLMJudge(tok, mode="score", min_label_prob=1e-6, batch_size=3)
    first, stats = judge.judge(run, ["What is 12 + 7?"], answers, 4)
    again, _ = judge.judge(run, ["What is 12 + 7?"], answers, 4)
    assert torch.equal(first, again) and ((first >= 1) & (first <= 10)).all()
    assert len(set(first.tolist())) == 4 and stats["judge/unparseable"] == 0
    strict, stats = LLMJudge(tok, mode="score").judge(run, ["What is 12 + 7?"], answers, 4)
    assert strict.isnan().all() and stats["judge/unparseable"] == 4  # a random model rarely replies with a number
    total, count = stats["judge/label_mass"]
    assert count == 4 and 0 < total / count < 0.5


def test_a_judge_refuses_a_mode_or_template_it_cannot_use(tiny_tokenizer):
    with pytest.raises(ValueError, match="judge mode 'vote'"):
        LLMJudge(tiny_tokenizer, mode="vote")
    with pytest.raises(ValueError, match="lacks the fields"):
        LLMJudge(tiny_tokenizer, mode="score", template="{prompt}")
