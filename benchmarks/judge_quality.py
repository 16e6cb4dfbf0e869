"""Does an LLM judge (recipe=rlaif, recipe=self_rewarding) tell a right answer from a wrong one?
Measured before spending a training run on it: held-out builtin:arithmetic_preference pairs (the same
problem, the right worked answer and a plausible slip), judged as the training judge would.

    python benchmarks/judge_quality.py                                  # builtin:smollm2-135m, 64 pairs
    python benchmarks/judge_quality.py --judge <run dir>/final --pairs 128

Prints, for the score rubric: the label mass (how likely a reply starts with 1-10; recipe=self_rewarding
counts a score from 0.1), the mean score of right and wrong answers and the AUC (the chance that a
right answer outscores a wrong one: 0.5 is no signal); for the pairwise rubric in both orders: how
often the right answer wins, loses or ties under judge_position=agree and =average, and how often the
two orders disagree (the verdict follows the position). The default rubrics of polmctl/rollout/judges.py.
"""

from __future__ import annotations

import argparse

import torch

from polmctl.config.schema import ModelConfig
from polmctl.data.builtin.preference import arithmetic_preference
from polmctl.models import load_model, load_tokenizer
from polmctl.rollout.judges import LLMJudge, pairwise_verdicts, read_scores


def auc(right: list[float], wrong: list[float]) -> float:
    wins = [(r > w) + 0.5 * (r == w) for r in right for w in wrong]
    return sum(wins) / len(wins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--judge", default="builtin:smollm2-135m")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    cfg = ModelConfig(name_or_path=args.judge, dtype=args.dtype)
    tokenizer, model = load_tokenizer(cfg), load_model(cfg, for_training=False, head="causal_lm").eval()
    rows = arithmetic_preference("test", n=args.pairs)
    with torch.no_grad():
        run = lambda fn: fn(model)  # noqa: E731
        score = LLMJudge(tokenizer, mode="score", min_label_prob=0.0)
        queries = [score.query(prompt=r["prompt"], answer=a) for r in rows for a in (r["chosen"], r["rejected"])]
        probs = score.probabilities(run, queries)
        mass, scores = probs.sum(-1), read_scores(probs, 0.0)
        right, wrong = scores[0::2].tolist(), scores[1::2].tolist()
        print(f"judge {args.judge}, {len(rows)} held-out arithmetic pairs")
        print(
            f"score: label mass {mass.mean():.2f} (min {mass.min():.2f}, max {mass.max():.2f}); mean score right "
            f"{sum(right) / len(right):.2f}, wrong {sum(wrong) / len(wrong):.2f}; AUC {auc(right, wrong):.2f}"
        )
        pairwise = LLMJudge(tokenizer, mode="pairwise")
        first = [pairwise.query(prompt=r["prompt"], answer_a=r["chosen"], answer_b=r["rejected"]) for r in rows]
        swapped = [pairwise.query(prompt=r["prompt"], answer_a=r["rejected"], answer_b=r["chosen"]) for r in rows]
        probs = pairwise.probabilities(run, first + swapped)
        n = len(rows)
        for position in ("agree", "average"):
            verdicts, inconsistent = pairwise_verdicts(probs[:n], probs[n:], position)
            print(
                f"pairwise {position}: right wins {(verdicts > 0).float().mean():.2f}, loses "
                f"{(verdicts < 0).float().mean():.2f}, ties {(verdicts == 0).float().mean():.2f}; the orders "
                f"disagree on {inconsistent.float().mean():.2f}"
            )


if __name__ == "__main__":
    main()
