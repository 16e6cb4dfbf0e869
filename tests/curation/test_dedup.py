"""Exact and near duplicates: the planted copies go, every distinct row stays."""

from __future__ import annotations

import random

import pytest

from polmctl.curation.dedup import exact_duplicates, jaccard, near_duplicates, shingles

pytestmark = pytest.mark.unit

WORDS = (
    "river stone lantern copper meadow violet engine harbor thunder pepper saddle orbit marble canyon ribbon "
    "falcon window garden silver puzzle candle anchor forest rocket velvet mirror basket tunnel planet cotton"
).split()


def distinct_rows(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, 12)) + "." for _ in range(n)]


def test_exact_duplicates_ignore_whitespace_but_not_case():
    texts = ["a b c", "a  b\nc ", "A b c", "d e f", "a b c"]
    assert exact_duplicates(texts) == {1: 0, 4: 0}


def test_near_duplicates_drop_the_planted_copies_and_keep_the_rest():
    base = distinct_rows()
    texts = list(base)
    planted = {}
    for k, source in enumerate((3, 11, 27)):
        texts.append(base[source].upper().replace(".", "!") if k == 0 else base[source].replace(" ", "  ", 2) + " ok")
        planted[len(texts) - 1] = source
    words = base[5].split()
    texts.append(" ".join(words[:6] + WORDS[:6]))  # half the same words: below 0.8, kept
    found = near_duplicates(texts, 0.8)
    assert {row: d.of for row, d in found.items()} == planted
    assert all(d.similarity >= 0.8 for d in found.values())
    assert jaccard(shingles(texts[-1]), shingles(base[5])) < 0.8


def test_a_dropped_row_is_never_the_match_of_a_later_one():
    texts = ["alpha beta gamma delta epsilon", "alpha beta gamma delta epsilon!", "alpha beta gamma delta epsilon?"]
    found = near_duplicates(texts, 0.8, skip={0})
    assert list(found) == [2] and found[2].of == 1
