"""Retrieval-augmented fine-tuning rows (RAFT, Zhang et al. 2024): each question with its oracle
document among sampled distractors, or (a ``1 - p_oracle`` fraction) among distractors only, so the
model learns both to use the right document and to answer when retrieval missed it.

    polmctl data raft qa.jsonl docs.jsonl --out raft.jsonl --distractors 3 --p-oracle 0.8

QA rows: {question, answer, doc_id} (the oracle document's id); documents: {id, text}. Every row has
``distractors + 1`` documents in a shuffled order: the oracle and ``distractors`` others, or
``distractors + 1`` others. Exactly ``round(p_oracle * rows)`` rows hold their oracle. The output is
prompt/completion rows (SFT's format) with ``oracle_in_context`` and ``doc_ids`` beside them; every
draw comes from one generator seeded by ``seed``.
"""

from __future__ import annotations

import random
from typing import Any

from polmctl.errors import DataError

INSTRUCTION = (
    "Answer the question using the documents below. If none of them holds the answer, answer from what you know."
)


def _text(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and column in ("id", "doc_id"):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        state = "is missing" if column not in row else "is empty or not text"
        raise DataError(f"{where}, column '{column}' {state}")
    return value


def documents(rows: list[dict], source: str) -> dict[str, str]:
    """``{id: text}``; ids must be unique."""
    docs: dict[str, str] = {}
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        doc_id, text = _text(row, "id", where), _text(row, "text", where)
        if doc_id in docs:
            raise DataError(f"{where}: document id {doc_id!r} repeats an earlier row's; give every document its own id")
        docs[doc_id] = text
    return docs


def render_prompt(question: str, texts: list[str], instruction: str = INSTRUCTION) -> str:
    blocks = "\n".join(f"<DOCUMENT>{t}</DOCUMENT>" for t in texts)
    return f"{instruction}\n\n{blocks}\n\nQuestion: {question}"


def build_raft(
    qa_rows: list[dict],
    docs: dict[str, str],
    *,
    distractors: int,
    p_oracle: float,
    seed: int = 0,
    source: str = "qa",
    question_column: str = "question",
    answer_column: str = "answer",
    oracle_column: str = "doc_id",
    instruction: str = INSTRUCTION,
) -> list[dict[str, Any]]:
    if distractors < 1:
        raise DataError(f"--distractors={distractors}: use at least 1 distractor document")
    if not 0 <= p_oracle <= 1:
        raise DataError(f"--p-oracle={p_oracle}: a fraction in [0, 1] of the rows that hold their oracle document")
    if len(docs) < distractors + 2:
        raise DataError(
            f"{len(docs)} documents cannot give {distractors + 1} documents other than the oracle to a row without it; "
            f"add documents or lower --distractors (at most {len(docs) - 2})"
        )
    questions = []
    for i, row in enumerate(qa_rows):
        where = f"{source}: row {i}"
        oracle = _text(row, oracle_column, where)
        if oracle not in docs:
            raise DataError(f"{where}, column '{oracle_column}': no document has id {oracle!r}")
        questions.append((_text(row, question_column, where), _text(row, answer_column, where), oracle))
    rng = random.Random(f"raft:{seed}")
    with_oracle = set(rng.sample(range(len(questions)), round(p_oracle * len(questions))))
    ids = list(docs)
    out = []
    for i, (question, answer, oracle) in enumerate(questions):
        has = i in with_oracle
        k = distractors if has else distractors + 1
        picked = [d for d in rng.sample(ids, k + 1) if d != oracle][:k]  # k + 1 draws: one may be the oracle
        chosen = picked + [oracle] if has else picked
        rng.shuffle(chosen)
        out.append(
            {
                "prompt": render_prompt(question, [docs[d] for d in chosen], instruction),
                "completion": answer,
                "oracle_in_context": has,
                "oracle_id": oracle,
                "doc_ids": chosen,
            }
        )
    return out
