"""RAFT rows: the oracle in exactly the asked fraction, distractors never the oracle, the same rows for
the same seed, and prompt/completion rows the SFT encoder takes."""

from __future__ import annotations

import pytest

from polmctl.curation.raft import build_raft, documents
from polmctl.data import detect_format, encode_dataset
from polmctl.errors import DataError
from polmctl.models.tiny import build_tiny_tokenizer

pytestmark = pytest.mark.unit

DOCS = {f"d{i}": f"Document {i} says that item {i} weighs {10 + i} grams." for i in range(12)}
QA = [
    {"question": f"How much does item {i % 12} weigh?", "answer": f"{10 + i % 12} grams.", "doc_id": f"d{i % 12}"}
    for i in range(40)
]


def test_the_oracle_is_present_in_the_asked_fraction_and_distractors_are_never_it():
    rows = build_raft(QA, DOCS, distractors=3, p_oracle=0.75, seed=1)
    assert len(rows) == 40 and sum(r["oracle_in_context"] for r in rows) == 30
    for qa, row in zip(QA, rows):
        assert len(row["doc_ids"]) == 4 and len(set(row["doc_ids"])) == 4
        assert (qa["doc_id"] in row["doc_ids"]) == row["oracle_in_context"]
        assert row["oracle_id"] == qa["doc_id"] and row["completion"] == qa["answer"]
        for doc_id in row["doc_ids"]:
            assert f"<DOCUMENT>{DOCS[doc_id]}</DOCUMENT>" in row["prompt"]
        assert row["prompt"].endswith(f"Question: {qa['question']}")
    positions = {r["doc_ids"].index(r["oracle_id"]) for r in rows if r["oracle_in_context"]}
    assert len(positions) > 1  # the oracle is not always in the same place


def test_same_seed_same_rows_other_seed_other_rows():
    a = build_raft(QA, DOCS, distractors=2, p_oracle=0.5, seed=7)
    assert a == build_raft(QA, DOCS, distractors=2, p_oracle=0.5, seed=7)
    assert a != build_raft(QA, DOCS, distractors=2, p_oracle=0.5, seed=8)
    assert sum(r["oracle_in_context"] for r in build_raft(QA, DOCS, distractors=2, p_oracle=0.0)) == 0


def test_raft_rows_are_sft_rows():
    rows = build_raft(QA, DOCS, distractors=3, p_oracle=0.8)
    assert detect_format(rows[0], "raft") == "prompt_completion"
    examples, stats = encode_dataset(rows, build_tiny_tokenizer(), source="raft", max_length=2048)
    assert stats.kept == 40 and stats.truncated == 0


def test_bad_inputs_name_the_row_and_column():
    with pytest.raises(DataError, match=r"qa: row 1, column 'doc_id': no document has id 'nope'"):
        build_raft([QA[0], {**QA[1], "doc_id": "nope"}], DOCS, distractors=2, p_oracle=0.5)
    with pytest.raises(DataError, match="at most 10"):
        build_raft(QA, DOCS, distractors=11, p_oracle=0.5)
    with pytest.raises(DataError, match=r"docs: row 1: document id 'a' repeats"):
        documents([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "docs")
    with pytest.raises(DataError, match=r"qa: row 0, column 'question' is missing"):
        build_raft([{"answer": "x", "doc_id": "d0"}], DOCS, distractors=2, p_oracle=0.5)
