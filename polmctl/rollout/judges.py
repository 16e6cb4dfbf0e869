"""An LLM as a judge of sampled answers (RLAIF): pairwise "which is better, A or B" with position
swapping, or a 1-10 score, read from the judge's next-token probabilities of the answer labels.

    polmctl run recipe=rlaif method.judge_mode=pairwise method.judge_model=builtin:smollm2-135m
    polmctl run recipe=rlaif method.judge_mode=score "method.judge_template='Rate ... {prompt} ... {answer} ...'"

The judge never generates. Its rubric (a template with {prompt} and {answer_a} / {answer_b}, or
{prompt} and {answer}) is rendered as one user turn with the judge's chat template, and the
probability of each label as the start of its reply ("A", "B"; "1" ... "10") is read off one
teacher-forced forward pass: deterministic, one pass per query (the query runs once for all its
labels), and graded (the probabilities, not only the top label). Where one label's tokens continue
another's ("1" and "10" when digits are separate tokens), P("1") counts only replies that do not
go on to "10", so the label probabilities are those of distinct replies and sum to the
probability that the reply starts with a label.

Pairwise: the judge is asked in both orders (A = i, B = j, then A = j, B = i). With
``position="agree"`` a verdict counts only when both orders agree, otherwise the comparison is
inconsistent (counted) and scores as a tie. With ``position="average"`` (balanced position
calibration, Wang et al., 2023, "Large Language Models are not Fair Evaluators") the verdict is the
side of 1/2 of the mean over both orders of P(i is better), so a judge biased to one position still
ranks by how much each answer moves its probabilities (SmolLM2-135M, asked which answer is better,
picks the same letter in either order: under "agree" all its comparisons on arithmetic answers are
ties). With k answers per prompt every pair is compared (identical answers tie without a query), and
an answer's score is its wins plus half its ties (a Copeland score). Score: the expected score
under the label probabilities, renormalised over the labels; a reply that is less likely than
``min_label_prob`` to start with a score label is unparseable: no score (NaN), counted.
"""

from __future__ import annotations

import string
from typing import Any, Callable, Sequence

import torch

from polmctl.data import format_prompt
from polmctl.data.preference import pad_sequences
from polmctl.losses import IGNORE_INDEX
from polmctl.models.forward import token_logps

JUDGE_MODES = ("pairwise", "score")
JUDGE_POSITIONS = ("agree", "average")
PAIRWISE_LABELS = ("A", "B")
SCORE_LABELS = tuple(str(s) for s in range(1, 11))
TEMPLATE_FIELDS = {"pairwise": ("prompt", "answer_a", "answer_b"), "score": ("prompt", "answer")}

DEFAULT_TEMPLATES = {
    "pairwise": (
        "Which answer to the question is better: more correct, more helpful and clearer?\n\n"
        "Question:\n{prompt}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n"
        "Reply with one letter: A or B."
    ),
    "score": (
        "Rate the answer to the question from 1 (wrong or useless) to 10 (correct, helpful and clear).\n\n"
        "Question:\n{prompt}\n\nAnswer:\n{answer}\n\nReply with the number only."
    ),
}

# Runs a function of the judge model in eval mode without gradients (the caller decides which
# model: a separate one, the policy, or the reference).
RunJudge = Callable[[Callable[[torch.nn.Module], Any]], Any]


def template_problem(template: str, mode: str) -> str | None:
    """What is wrong with a rubric template for ``mode`` (its fields), or None when it is usable."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        return f"is not a format string ({err}); write literal braces as {{{{ and }}}}"
    wanted = set(TEMPLATE_FIELDS[mode])
    if fields - wanted:
        return f"has unknown fields {sorted(fields - wanted)}; the {mode} judge fills {sorted(wanted)}"
    if wanted - fields:
        return f"lacks the fields {sorted(wanted - fields)} that the {mode} judge fills"
    return None


def prompt_text(prompt: Any) -> str:
    """A row's prompt as text for the rubric: a string as it is, a message list as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    if any(not i for i in ids) or len({tuple(i) for i in ids}) < len(ids):
        raise ValueError(f"the judge's labels {list(labels)} do not tokenize to distinct, non-empty token sequences")
    return ids


def _continuations(label_ids: list[list[int]]) -> list[list[int]]:
    """For each label, the labels whose tokens continue it with no other label in between."""

    def extends(longer: list[int], shorter: list[int]) -> bool:
        return len(longer) > len(shorter) and longer[: len(shorter)] == shorter

    out = []
    for a in label_ids:
        longer = [j for j, b in enumerate(label_ids) if extends(b, a)]
        out.append([j for j in longer if not any(extends(label_ids[j], label_ids[m]) for m in longer if m != j)])
    return out


@torch.no_grad()
def label_probabilities(model, tokenizer, queries: Sequence[str], labels: Sequence[str], *, batch_size: int = 8):
    """[Q, L]: the probability that ``model``'s reply to each rendered query reads as each label
    (a label that another continues excludes those continuations)."""
    label_ids = label_token_ids(tokenizer, labels)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(queries), batch_size):
        sequences, targets = [], []
        for query in queries[start : start + batch_size]:
            query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
            for ids in label_ids:
                sequences.append(query_ids + ids)
                targets.append([IGNORE_INDEX] * len(query_ids) + ids)
        batch = {k: v.to(device) for k, v in pad_sequences(sequences, targets, tokenizer.pad_token_id).items()}
        logps, mask = token_logps(model, batch, share_prompts=True)  # the query runs once for its labels
        chunks.append((logps * mask).sum(-1).float().exp().view(-1, len(labels)).cpu())
    whole = torch.cat(chunks) if chunks else torch.zeros(0, len(labels))
    exact = whole.clone()
    for i, longer in enumerate(_continuations(label_ids)):
        for j in longer:
            exact[:, i] -= whole[:, j]
    return exact.clamp(min=0)


def read_scores(probs: torch.Tensor, min_label_prob: float, values: Sequence[float] | None = None) -> torch.Tensor:
    """[N]: each reply's expected score under its label probabilities ([N, L], renormalised over the
    labels; ``values`` default 1..L), NaN where the labels hold less than ``min_label_prob``."""
    values = torch.arange(1, probs.size(-1) + 1, dtype=torch.float32) if values is None else torch.tensor(values)
    mass = probs.sum(-1)
    scores = (probs * values).sum(-1) / mass.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(mass >= min_label_prob, scores, torch.full_like(scores, float("nan")))


def pairwise_verdicts(
    first: torch.Tensor, swapped: torch.Tensor | None, position: str = "agree"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verdicts on n comparisons of answers i and j: +1 i is better, -1 j is, 0 a tie, from the
    label probabilities [n, 2] of (A, B) with i shown as A (``first``) and, when swapping, with j
    shown as A (``swapped``). Returns the verdicts and which comparisons were inconsistent (the two
    orders disagree: a verdict that follows the position, not the answer). ``position``: ``agree``
    makes those ties; ``average`` decides every comparison by sign(mean(P1(i), P2(i)) - 1/2), where
    P1(i) = P(A) / (P(A) + P(B)) in the first order and P2(i) = P(B) / (P(A) + P(B)) in the swapped one."""
    in_order = torch.sign(first[:, 0] - first[:, 1])
    if swapped is None:
        return in_order, torch.zeros_like(in_order, dtype=torch.bool)
    reversed_order = torch.sign(swapped[:, 1] - swapped[:, 0])  # i is answer B there
    inconsistent = in_order != reversed_order
    if position == "average":
        tiny = torch.finfo(first.dtype).tiny
        i_better = (first[:, 0] / first.sum(-1).clamp(min=tiny) + swapped[:, 1] / swapped.sum(-1).clamp(min=tiny)) / 2
        return torch.sign(i_better - 0.5), inconsistent
    return torch.where(inconsistent, torch.zeros_like(in_order), in_order), inconsistent


def copeland_scores(k: int, pairs: Sequence[tuple[int, int]], verdicts: torch.Tensor) -> torch.Tensor:
    """[k]: each answer's wins over the others plus half its ties."""
    scores = torch.zeros(k)
    for (i, j), verdict in zip(pairs, verdicts.tolist()):
        scores[i] += (verdict + 1) / 2
        scores[j] += (1 - verdict) / 2
    return scores


class LLMJudge:
    """Scores k answers per prompt with a language model and a rubric (see the module docstring).

    ``judge(run, prompts, completions, k)``: ``prompts`` has one entry per group, ``completions`` k
    per group (consecutive), ``run`` runs a function of the judge model (eval mode, no gradients).
    Returns one score per completion (higher is better; NaN: no score) and metrics for the log:
    counts, and ``judge/label_mass`` (the probability the judge's replies start with a label) as a
    (sum, count) pair to average."""

    def __init__(
        self,
        tokenizer,
        *,
        mode: str,
        template: str = "",
        swap: bool = True,
        position: str = "agree",
        min_label_prob: float = 0.5,
        batch_size: int = 8,
    ):
        if mode not in JUDGE_MODES:
            raise ValueError(f"judge mode {mode!r}; allowed: {', '.join(JUDGE_MODES)}")
        if position not in JUDGE_POSITIONS:
            raise ValueError(f"judge position rule {position!r}; allowed: {', '.join(JUDGE_POSITIONS)}")
        self.tokenizer, self.mode, self.swap, self.position = tokenizer, mode, swap, position
        self.template = template or DEFAULT_TEMPLATES[mode]
        problem = template_problem(self.template, mode)
        if problem:
            raise ValueError(f"judge template {problem}")
        self.labels = PAIRWISE_LABELS if mode == "pairwise" else SCORE_LABELS
        label_token_ids(tokenizer, self.labels)  # fails now, not at the first rollout
        self.min_label_prob, self.batch_size = min_label_prob, batch_size

    def query(self, **fields: str) -> str:
        """The rendered judge prompt: the rubric as one user turn, up to the judge's reply."""
        return format_prompt(self.template.format(**fields), self.tokenizer)

    def probabilities(self, run: RunJudge, queries: list[str]) -> torch.Tensor:
        return run(
            lambda model: label_probabilities(model, self.tokenizer, queries, self.labels, batch_size=self.batch_size)
        )

    def judge(self, run: RunJudge, prompts: list, completions: list[str], k: int) -> tuple[torch.Tensor, dict]:
        if len(completions) != len(prompts) * k:
            raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts x {k}")
        if self.mode == "score":
            return self._score(run, prompts, completions, k)
        return self._tournament(run, prompts, completions, k)

    def _score(self, run: RunJudge, prompts: list, completions: list[str], k: int) -> tuple[torch.Tensor, dict]:
        queries = [self.query(prompt=prompt_text(prompts[n // k]), answer=c) for n, c in enumerate(completions)]
        probs = self.probabilities(run, queries)
        scores = read_scores(probs, self.min_label_prob)
        return scores, {
            "judge/unparseable": float(scores.isnan().sum()),
            "judge/label_mass": (probs.sum().item(), len(queries)),
        }

    def _tournament(self, run: RunJudge, prompts: list, completions: list[str], k: int) -> tuple[torch.Tensor, dict]:
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        asked, first, swapped = [], [], []  # asked: (group, pair index) of each comparison put to the judge
        for g, prompt in enumerate(prompts):
            text, group = prompt_text(prompt), completions[g * k : (g + 1) * k]
            for p, (i, j) in enumerate(pairs):
                if group[i] == group[j]:
                    continue  # identical answers tie; any verdict on them would be position bias
                asked.append((g, p))
                first.append(self.query(prompt=text, answer_a=group[i], answer_b=group[j]))
                if self.swap:
                    swapped.append(self.query(prompt=text, answer_a=group[j], answer_b=group[i]))
        probs = self.probabilities(run, first + swapped) if first else torch.zeros(0, 2)
        n = len(first)
        verdicts, inconsistent = pairwise_verdicts(probs[:n], probs[n:] if self.swap else None, self.position)
        table = torch.zeros(len(prompts), len(pairs))
        for (g, p), verdict in zip(asked, verdicts.tolist()):
            table[g, p] = verdict
        scores = torch.cat([copeland_scores(k, pairs, row) for row in table])
        return scores, {
            "judge/comparisons": float(n),
            "judge/inconsistent": float(inconsistent.sum()),
            "judge/label_mass": (probs.sum().item(), probs.size(0)),
        }
