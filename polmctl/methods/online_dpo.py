"""Online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback") and
RLAIF: every step samples k answers per prompt from the current policy, a judge orders them, the
best and the worst become a pair, and DPO's loss trains on it against the reference.

    polmctl run recipe=online_dpo                                       # judged by method.rewards (math_answer)
    polmctl run recipe=online_dpo method.judge=reward_model method.judge_model=<reward_model run dir>
    polmctl run recipe=rlaif                                            # an LLM judge, pairwise, both orders
    polmctl run recipe=rlaif method.judge_mode=score method.judge_model=reference
    polmctl run recipe=self_rewarding                                   # rounds of sample -> judge -> DPO

Features and the flag that controls each:
  answers per prompt               method.num_generations (k >= 2; pairs per step = micro_batch_size x grad_accum)
  the judge                        method.judge: rewards | reward_model | llm
  reward functions (judge=rewards) method.rewards: [math_answer, {name: format, weight: 0.2}, {_target_: ...}]
  the judge's model                method.judge_model: a reward_model run dir (judge=reward_model); builtin:<name>,
                                   a model dir, policy or reference (judge=llm; reference: the model this run
                                   started from, no second copy)
  LLM rubric                       method.judge_mode: pairwise | score, method.judge_template
  position swapping                method.judge_swap (pairwise: both orders), method.judge_position: agree
                                   (inconsistent verdicts are ties) | average (balanced position calibration)
  unparseable scores               method.judge_min_label_prob (score: less label mass -> no score, counted)
  ties                             method.skip_ties (true: a group scored all equal is skipped; false: TRL's rule)
  answers cut off                  method.missing_eos_penalty (subtracted from scores; not with a pairwise judge)
  refill a step after skips        method.max_resamples
  loss                             method.loss (recipe=dpo's: sigmoid, ipo, ...), method.beta, method.label_smoothing
  sampling                         method.temperature, method.top_p, method.top_k, method.max_new_tokens, method.stop

Pairs: per prompt the chosen answer is the first (in sampling order) of those with the highest
score and the rejected one the last of those with the lowest, so with k = 2 and equal scores the
first sample is chosen, as TRL's OnlineDPOTrainer does (``first >= second``). A group whose scores
are all equal says nothing about which answer is better; it is skipped (``tied_groups``) unless
``method.skip_ties=false``, and the step samples more prompts (up to ``method.max_resamples``
rollouts) to fill its pairs. A group with fewer than two scored answers (an LLM judge's
unparseable scores) is skipped too. The reference's log-probs of each pair are computed with the
rollout, before the step (methods/reference.py: adapters off with LoRA, else a frozen copy);
the loss is DPO's (polmctl/methods/preference.py, polmctl/losses/preference.py), IPO on
length-averaged log-probs as in recipe=dpo (TRL's online trainer sums them). The judges are built
in polmctl/methods/judging.py; the LLM judge is polmctl/rollout/judges.py. Where the rows have an
``answer`` column (builtin:arithmetic), every step also logs how often the sampled, chosen and
rejected answers are right and how often the judge prefers the right one of a pair that has one
right answer (``judge/agreement``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from polmctl.config.schema import ModelConfig, RunConfig, one_of, option, positive
from polmctl.console import warn
from polmctl.data import format_prompt
from polmctl.data.preference import preference_collate
from polmctl.data.prompts import prompt_of, prompt_rows
from polmctl.engine.batches import BatchSampler, BatchSource, on_every_rank
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError, TrainingError
from polmctl.methods.judging import POLICY, REFERENCE, build_judge
from polmctl.methods.preference import DPOMethod, PairwiseObjective
from polmctl.models.forward import sequence_logps
from polmctl.rollout.backends import make_backend
from polmctl.rollout.judges import JUDGE_MODES, JUDGE_POSITIONS, template_problem
from polmctl.rollout.reward_data import check_reward_data
from polmctl.rollout.rewards import math_answer
from polmctl.rollout.sampling import SamplingOptions

JUDGES = ("rewards", "reward_model", "llm")


@dataclass
class OnlineDPOMethod(SamplingOptions):
    name: str = option("online_dpo", "online_dpo: DPO on pairs of the policy's own answers, ordered by a judge")
    num_generations: int = option(2, "answers sampled per prompt (k >= 2); the judge's best and worst make the pair")
    judge: str = option(
        "rewards",
        "who orders the answers: rewards (method.rewards) | reward_model (method.judge_model) | "
        "llm (method.judge_model prompted with method.judge_template)",
    )
    rewards: List[Any] = option(
        ["math_answer"],
        "judge=rewards: reward functions (registry names, {name|_target_, weight, ...} specs) as in "
        "recipe=grpo; their weighted sum is the score",
    )
    judge_model: str = option(
        "builtin:smollm2-135m",
        "judge=llm: builtin:<name>, a model or run dir, policy (the model being trained) or reference "
        "(the model this run started from); judge=reward_model: a reward_model run dir or model dir",
    )
    judge_mode: str = option("pairwise", "judge=llm: pairwise (is A or B better) | score (1-10)")
    judge_template: str = option(
        "",
        "judge=llm: the rubric, with {prompt} {answer_a} {answer_b} (pairwise) or {prompt} {answer} "
        "(score); empty: the mode's default (polmctl/rollout/judges.py)",
    )
    judge_swap: bool = option(
        True, "judge=llm pairwise: ask in both orders (position bias), combined by judge_position"
    )
    judge_position: str = option(
        "agree",
        "judge=llm pairwise, both orders: agree (a verdict counts where both orders agree, others are ties) | "
        "average (the mean over both orders of P(answer better) against 1/2: balanced position calibration)",
    )
    judge_min_label_prob: float = option(
        0.5, "judge=llm score: a reply less likely than this to start with a score 1-10 is unparseable (skipped)"
    )
    judge_batch_size: int = option(8, "judge=llm: judge prompts per forward pass")
    skip_ties: bool = option(
        True,
        "skip a prompt whose answers the judge scores all equal (false: train on it, the first sample "
        "chosen, as TRL's OnlineDPOTrainer)",
    )
    missing_eos_penalty: float = option(0.0, "subtracted from the score of an answer that does not end with EOS")
    max_resamples: int = option(4, "rollouts a step may take to fill its pairs when prompts are skipped")
    loss: str = option("sigmoid", "a DPO loss as in recipe=dpo: sigmoid (DPO) | ipo | robust (cDPO) | hinge | ...")
    beta: float = option(0.1, "strength of the KL constraint to the reference (higher: stay closer)")
    label_smoothing: float = option(0.0, "as in recipe=dpo: the assumed fraction of flipped labels (sigmoid, robust)")

    def check(self, section: str) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                f"{section}.num_generations", f"must be at least 2 to make a pair, got {self.num_generations}"
            )
        one_of(section, "judge", self.judge, JUDGES)
        self.dpo().check(section)  # loss, beta, label_smoothing: recipe=dpo's checks, under the same keys
        for name in ("max_resamples", "judge_batch_size"):
            positive(section, name, getattr(self, name))
        positive(section, "missing_eos_penalty", self.missing_eos_penalty, zero_ok=True)
        self.check_sampling(section)
        if self.judge == "rewards" and not self.rewards:
            raise ConfigError(
                f"{section}.rewards", "judge=rewards needs at least one reward function, e.g. [math_answer]"
            )
        if self.judge == "reward_model" and (
            self.judge_model in (POLICY, REFERENCE, "") or self.judge_model.startswith("builtin:")
        ):
            raise ConfigError(
                f"{section}.judge_model",
                f"judge=reward_model scores with a trained reward model, got {self.judge_model!r}; "
                "give the run dir (or final/) of a recipe=reward_model run",
            )
        if self.judge == "llm":
            self._check_llm(section)

    def _check_llm(self, section: str) -> None:
        if not self.judge_model:
            raise ConfigError(
                f"{section}.judge_model", "is empty; give builtin:<name>, a model dir, policy or reference"
            )
        one_of(section, "judge_mode", self.judge_mode, JUDGE_MODES)
        one_of(section, "judge_position", self.judge_position, JUDGE_POSITIONS)
        problem = self.judge_template and template_problem(self.judge_template, self.judge_mode)
        if problem:
            raise ConfigError(f"{section}.judge_template", problem)
        if not 0 < self.judge_min_label_prob <= 1:
            raise ConfigError(
                f"{section}.judge_min_label_prob", f"must be in (0, 1], got {self.judge_min_label_prob!r}"
            )
        if self.judge_mode == "pairwise" and self.missing_eos_penalty:
            raise ConfigError(
                f"{section}.missing_eos_penalty",
                "a pairwise judge gives wins, not scores, so there is nothing to subtract it from; "
                "set it to 0 or use method.judge_mode=score",
            )
        unused = self.unused_position(section)
        if unused:
            warn(unused)

    def unused_position(self, section: str) -> Optional[str]:
        """Why judge_position=average does nothing in this judge=llm setting (None where it applies). A
        warning, not an error: recipe=rlaif sets it, and its score-mode and one-order variants inherit it."""
        if self.judge_position != "average" or (self.judge_mode == "pairwise" and self.judge_swap):
            return None
        score = self.judge_mode == "score"
        why = "scores one answer at a time (judge_mode=score)" if score else "asks in one order (judge_swap=false)"
        return (
            f"{section}.judge_position=average is unused: only a pairwise judge asking both orders "
            f"(judge_swap=true) averages them, and this one {why}; set {section}.judge_position=agree to silence this"
        )

    def dpo(self) -> DPOMethod:
        """The DPO settings of the loss (the reference's log-probs come with each batch)."""
        return DPOMethod(
            loss=self.loss, beta=self.beta, label_smoothing=self.label_smoothing, precompute_ref_logps=False
        )

    def separate_judge(self) -> Optional[str]:
        """The model the judge loads besides the policy (None: the judge is functions, the policy or the reference)."""
        if self.judge == "reward_model" or (self.judge == "llm" and self.judge_model not in (POLICY, REFERENCE)):
            return self.judge_model
        return None


def second_model(run: RunConfig) -> Optional[tuple[str, Optional[ModelConfig]]]:
    """What the run holds besides the policy (for ``polmctl plan``): a judge model it loads, else a
    frozen reference copy with full fine-tuning. With both, only the judge's weights are counted."""
    m, frozen = run.method, run.peft.method == "none"
    judge = m.separate_judge()
    if judge is not None:
        what = f"judge {judge}" + (" (+ a frozen reference copy, not counted)" if frozen else "")
        return what, ModelConfig(name_or_path=judge, cache_dir=run.model.cache_dir, dtype=run.model.dtype)
    return ("frozen reference copy", None) if frozen else None


def pick_pairs(scores: torch.Tensor, k: int, *, skip_ties: bool) -> tuple[list[tuple[int, int, int]], dict]:
    """(group, chosen index, rejected index) per group of k consecutive scores (NaN: unscored): the
    first of the best over the last of the worst. Returns them and the counts of tied and skipped groups."""
    pairs, tied, skipped = [], 0, 0
    for g in range(scores.numel() // k):
        group = scores[g * k : (g + 1) * k]
        scored = (~group.isnan()).nonzero().flatten().tolist()
        if len(scored) < 2:
            skipped += 1
            continue
        values = [group[i].item() for i in scored]
        best, worst = max(values), min(values)
        if best == worst:
            tied += 1
            if skip_ties:
                skipped += 1
                continue
        chosen = next(i for i, v in zip(scored, values) if v == best)
        rejected = [i for i, v in zip(scored, values) if v == worst][-1]
        pairs.append((g, g * k + chosen, g * k + rejected))
    return pairs, {"tied_groups": float(tied), "skipped_groups": float(skipped)}


# -- the objective and its batch source ------------------------------------------------------------------------


class OnlineDPOObjective(Objective):
    """DPO's step (``PairwiseObjective``) on batches of judged pairs, each carrying its reference log-probs."""

    def __init__(self, method: OnlineDPOMethod):
        self.method = method
        self.dpo = PairwiseObjective(method.dpo())
        self.reference = self.dpo.reference  # one reference: log-probs, and the judge when judge_model=reference
        self.judge_note: str | None = None

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], Any]:
        rows, stats = prompt_rows(rows, data.source)
        if self.method.judge != "rewards":
            return rows, stats
        return rows, check_reward_data(rows, self.method.rewards, data.source, stats)  # before the model loads

    def weight(self, batch: dict) -> int:
        return batch["input_ids"].size(0) // 2

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        return self.dpo(model, batch)

    def prepare(self, model, examples, *, device, model_id, cache_dir) -> str:
        return "; ".join(filter(None, [self.reference.freeze(model), self.judge_note]))

    def make_batches(self, examples: list[dict], *, model, tokenizer, cfg, accelerator) -> OnlineDPOBatches:
        source = OnlineDPOBatches(examples, objective=self, tokenizer=tokenizer, cfg=cfg, accelerator=accelerator)
        self.judge_note = source.judge_note
        return source


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_score: float
    rejected_score: float
    chosen_correct: Optional[float] = None  # with an answer column: is the answer right
    rejected_correct: Optional[float] = None


class OnlineDPOBatches(BatchSource):
    """Each step: the next prompts (micro_batch_size x grad_accum, one pair each), k samples of each
    from the current policy, the judge's scores, the pairs, and their reference log-probs."""

    counters = ("rollouts",)

    def __init__(self, rows: list[dict], *, objective: OnlineDPOObjective, tokenizer, cfg, accelerator):
        self.rows, self.method, self.tokenizer = rows, objective.method, tokenizer
        self.device, self.reference = accelerator.device, objective.reference
        self.micro_batch_size = cfg.trainer.micro_batch_size
        self.pairs_per_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum
        self.sampler = BatchSampler(
            len(rows),
            self.pairs_per_step,
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        self.backend = make_backend(self.method)
        self.judge, self.judge_note = build_judge(
            self.method, tokenizer=tokenizer, model_cfg=cfg.model, device=self.device, reference=self.reference
        )
        self.rollouts = 0

    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        m, k, tok = self.method, self.method.num_generations, self.tokenizer
        started, judge_time = time.perf_counter(), 0.0
        pairs: list[Pair] = []
        sums: dict[str, Any] = {}
        for _ in range(m.max_resamples):
            rows = [self.rows[i] for i in self.sampler.next()]
            ids = self.backend.sample(model, tok, [format_prompt(prompt_of(r), tok) for r in rows], k, m)
            texts = tok.batch_decode(ids, skip_special_tokens=True)
            judged = time.perf_counter()
            scores, stats = self.judge(model, rows, texts, k, self.rollouts)
            judge_time += time.perf_counter() - judged
            self.rollouts += 1
            ended = torch.tensor([bool(c) and c[-1] == tok.eos_token_id for c in ids])
            scores = scores.float() - m.missing_eos_penalty * (~ended).float()
            picked, counts = pick_pairs(scores, k, skip_ties=m.skip_ties)
            correct = self._correct(rows, texts, k)
            pairs += [self._pair(rows[g], ids, scores, correct, c, r) for g, c, r in picked]
            lengths = [float(len(c)) for c in ids]
            _add(sums, {**stats, **counts, "groups": float(len(rows)), "completion_length": (sum(lengths), len(ids))})
            _add(sums, {"frac_ended_with_eos": (ended.float().sum().item(), len(ids))})
            if correct is not None:
                _add(sums, {"verifiable/accuracy": (sum(correct), len(correct))})
            if on_every_rank(len(pairs) >= self.pairs_per_step):
                break
        if not pairs:
            judged = ", ".join(
                f"{int(sums[key])} {key.split('/')[1]}"
                for key in ("judge/inconsistent", "judge/unparseable")
                if key in sums
            )
            raise TrainingError(
                f"online_dpo: {m.max_resamples} rollouts of {self.pairs_per_step} prompts gave no pair to train on "
                f"({int(sums['tied_groups'])} prompts' answers all scored equal, {int(sums['skipped_groups'])} "
                f"skipped{'; judge: ' + judged if judged else ''}); raise method.num_generations or "
                "method.temperature, set method.skip_ties=false, or check the judge (method.judge_template, "
                "method.judge_min_label_prob, method.judge_swap)"
            )
        pairs = pairs[: self.pairs_per_step]
        batches = self._batches(model, pairs)
        metrics = {k: v[0] / max(v[1], 1) if isinstance(v, tuple) else v for k, v in sums.items()}
        metrics.update(_pair_metrics(pairs))
        metrics.update(rollout_time_s=time.perf_counter() - started, judge_time_s=judge_time)
        return batches, metrics

    def _correct(self, rows: list[dict], texts: list[str], k: int) -> list[float] | None:
        """Whether each answer is right, where the rows carry a verifiable ``answer``."""
        if any(r.get("answer") is None for r in rows):
            return None
        expanded = [r for r in rows for _ in range(k)]
        return math_answer([prompt_of(r) for r in expanded], texts, answer=[r["answer"] for r in expanded])

    def _pair(self, row: dict, ids, scores, correct, chosen: int, rejected: int) -> Pair:
        tok = self.tokenizer
        eos = tok.eos_token_id
        return Pair(
            prompt_ids=tok(format_prompt(prompt_of(row), tok), add_special_tokens=False)["input_ids"],
            chosen_ids=ids[chosen] or [eos],  # an empty answer is scored as a lone EOS token
            rejected_ids=ids[rejected] or [eos],
            chosen_score=scores[chosen].item(),
            rejected_score=scores[rejected].item(),
            chosen_correct=None if correct is None else correct[chosen],
            rejected_correct=None if correct is None else correct[rejected],
        )

    def _batches(self, model, pairs: list[Pair]) -> list[dict]:
        """DPO's micro-batches (chosen rows, then rejected), each with the reference's log-probs [B, 2]."""
        examples = [
            {"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs
        ]
        size, pad = self.micro_batch_size, self.tokenizer.pad_token_id
        batches = [preference_collate(examples[s : s + size], pad) for s in range(0, len(examples), size)]
        for batch in batches:
            on_device = {key: value.to(self.device) for key, value in batch.items()}
            logps = self.reference.run(model, lambda ref: sequence_logps(ref, on_device)[0]).cpu()
            half = logps.size(0) // 2
            batch["ref_logps"] = torch.stack([logps[:half], logps[half:]], dim=-1)
        return batches


def _add(sums: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, tuple):
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + value[0], count + value[1])
        else:
            sums[key] = sums.get(key, 0.0) + value


def _pair_metrics(pairs: list[Pair]) -> dict[str, float]:
    n = len(pairs)
    out = {
        "pairs": float(n),
        "judge/chosen_score": sum(p.chosen_score for p in pairs) / n,
        "judge/rejected_score": sum(p.rejected_score for p in pairs) / n,
    }
    out["judge/margin"] = out["judge/chosen_score"] - out["judge/rejected_score"]
    known = [p for p in pairs if p.chosen_correct is not None]
    if known:
        out["verifiable/chosen_correct"] = sum(p.chosen_correct for p in known) / len(known)
        out["verifiable/rejected_correct"] = sum(p.rejected_correct for p in known) / len(known)
        decisive = [p for p in known if p.chosen_correct != p.rejected_correct]
        if decisive:  # pairs with one right answer: did the judge prefer it?
            out["judge/agreement"] = sum(p.chosen_correct for p in decisive) / len(decisive)
    return out
