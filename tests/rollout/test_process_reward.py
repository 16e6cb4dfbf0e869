"""The prm reward (polmctl/rollout/process_reward.py): completions cut into steps at the separator,
each step scored at its separator token, min / product over the steps; on a fake PRM whose score
is written in each step, then on a saved tiny PRM against the prm eval task's scores."""

from __future__ import annotations

import math

import pytest
import torch

from polmctl.errors import ModelError, RewardError
from polmctl.models.tiny import build_tiny_tokenizer
from polmctl.rollout.process_reward import ProcessRewardScorer, aggregate_steps, load_prm_scorer, split_steps
from polmctl.rollout.rewards import CombinedReward, resolve_reward

pytestmark = pytest.mark.unit


class DigitPRM(torch.nn.Module):
    """A fake token-classification PRM: at each position, P(correct) is the digit just before it / 10
    (0.5 after anything else), so a step ending in 7 scores 0.7 at its separator."""

    def __init__(self, tokenizer, separator: str | None = None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.register_buffer("p", torch.tensor([int(t) / 10 if t in "123456789" else 0.5 for t in tokens]))
        self.config = type("Config", (), {"step_separator": separator})()
        self.calls = 0

    def forward(self, input_ids, attention_mask, use_cache):
        self.calls += 1
        p = torch.full(input_ids.shape, 0.5)
        p[:, 1:] = self.p[input_ids[:, :-1]]
        return type("Out", (), {"logits": torch.stack([torch.log1p(-p), torch.log(p)], dim=-1)})


@pytest.fixture()
def fake():
    tokenizer = build_tiny_tokenizer()
    return ProcessRewardScorer(DigitPRM(tokenizer), tokenizer, batch_size=2)


def test_aggregates():
    assert aggregate_steps([0.2, 0.5, 0.9], "min") == 0.2
    assert aggregate_steps([0.2, 0.5, 0.9], "product") == pytest.approx(0.09)
    assert aggregate_steps([], "min") == aggregate_steps([], "product") == 0.0
    with pytest.raises(ValueError, match="aggregate='mean': use one of min, product"):
        aggregate_steps([0.5], "mean")


def test_steps_are_cut_at_the_separator_stripped_and_never_empty():
    assert split_steps("a 2\nb 5\nThe answer is 7", "\n") == ["a 2", "b 5", "The answer is 7"]
    assert split_steps("  a 2 \n\n b 5\n", "\n") == ["a 2", "b 5"]
    assert split_steps("\n \n", "\n") == [] and split_steps("one step", "\n") == ["one step"]


def test_each_step_is_scored_and_min_or_product_aggregates_them(fake):
    prompts = ["q1", "q2", "q3", "q4"]
    completions = ["x = 2\ny = 5\nanswer 9", "  z = 8 \n\n", "", "w 3\nv 4"]
    scores = fake.step_scores(prompts, completions, "\n")
    assert [[round(s, 6) for s in row] for row in scores] == [[0.2, 0.5, 0.9], [0.8], [], [0.3, 0.4]]
    assert fake(prompts, completions) == pytest.approx([0.2, 0.8, 0.0, 0.3])
    assert fake(prompts, completions, aggregate="product") == pytest.approx([0.09, 0.8, 0.0, 0.12])
    assert fake.model.calls == 3 * 2  # three calls, each 3 non-empty completions in batches of 2: "" never runs
    one_by_one = ProcessRewardScorer(fake.model, fake.tokenizer, batch_size=1)
    assert one_by_one(prompts, completions) == pytest.approx([0.2, 0.8, 0.0, 0.3])  # padding changes nothing
    # Another separator (one token: the fake reads the token before the label), from the config or the kwargs.
    assert fake(["q"], ["x = 2; y = 6"], step_separator=";") == pytest.approx([0.2])
    tokenizer = fake.tokenizer
    assert ProcessRewardScorer(DigitPRM(tokenizer, separator=";"), tokenizer)(
        ["q"], ["x = 2; y = 6"], aggregate="product"
    ) == pytest.approx([0.12])


def test_a_bad_aggregate_fails_before_any_forward_pass(fake):
    with pytest.raises(ValueError, match="aggregate='max'"):
        fake(["q"], ["x 2"], aggregate="max")
    assert fake.model.calls == 0


# --- a saved PRM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, head="prm")
    model.config.step_separator = "\n"
    return save_model(model, tok, tmp_path_factory.mktemp("prm") / "final")


def test_the_reward_scores_steps_as_the_prm_eval_does(prm_dir):
    from polmctl.config.schema import ModelConfig
    from polmctl.data import load_rows
    from polmctl.evals.steps import prm_accuracy
    from polmctl.models import load_model, load_tokenizer

    name, scorer = resolve_reward({"name": "prm", "path": str(prm_dir), "batch_size": 3})
    assert name == "prm" and isinstance(scorer, ProcessRewardScorer) and scorer.separator == "\n"
    rows = load_rows("builtin:arithmetic_steps", "test", max_rows=5)
    prompts, completions = [r["prompt"] for r in rows], ["\n".join(r["completions"]) for r in rows]
    ours = scorer.step_scores(prompts, completions, "\n")
    cfg = ModelConfig(name_or_path=str(prm_dir))
    samples = prm_accuracy(load_model(cfg, for_training=False), load_tokenizer(cfg), rows, batch_size=2)["samples"]
    assert [len(s) for s in ours] == [len(r["completions"]) for r in rows]
    for mine, theirs in zip(ours, samples):
        assert mine == pytest.approx(theirs["scores"], abs=1e-5)
    assert len({round(s, 6) for row in ours for s in row}) > 3  # input-dependent scores
    assert scorer(prompts, completions) == pytest.approx([min(s) for s in ours])
    assert scorer(prompts, completions, aggregate="product") == pytest.approx([math.prod(s) for s in ours])


def test_the_prm_reward_combines_and_its_kwargs_reach_it(prm_dir):
    spec = {"name": "prm", "path": str(prm_dir), "weight": 2.0, "kwargs": {"aggregate": "product"}}
    total, parts = CombinedReward.from_specs([spec])(["q"], ["1 + 1 = 2.\nThe answer is 2."], {"answer": ["2"]})
    scorer = load_prm_scorer(str(prm_dir))
    assert parts["prm"].tolist() == pytest.approx(scorer(["q"], ["1 + 1 = 2.\nThe answer is 2."], aggregate="product"))
    assert total.tolist() == pytest.approx([2 * parts["prm"].item()])
    bad = CombinedReward.from_specs([{**spec, "kwargs": {"aggregate": "mean"}}])
    with pytest.raises(RewardError, match="reward 'prm' on batch 0 raised ValueError: aggregate='mean'"):
        bad(["q"], ["x"])


def test_a_model_that_is_not_a_prm_is_refused(tmp_path):
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model, load_tokenizer, save_model
    from polmctl.models.tiny import write_tiny

    write_tiny(tmp_path / "lm")
    with pytest.raises(ModelError, match="holds a causal_lm model, not a process reward model; .*recipe=prm"):
        load_prm_scorer(str(tmp_path / "lm"))
    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    save_model(load_model(cfg, head="reward", pad_token_id=tok.pad_token_id), tok, tmp_path / "rm")
    with pytest.raises(ModelError, match="holds a reward model"):
        load_prm_scorer(str(tmp_path / "rm"))
