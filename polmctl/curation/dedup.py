"""Exact and near-duplicate rows.

    polmctl data filter rows.jsonl --out kept.jsonl --dedup --near-dedup 0.8

Exact: the same text once whitespace is collapsed (case kept). Near: MinHash signatures (datasketch)
of each text's character 5-grams (lowercased, whitespace collapsed), candidates found by LSH at the
threshold, then confirmed by the 5-gram sets' true Jaccard similarity. Rows are taken in order: a row
is a duplicate of the first earlier row it matches, and the first of a group is kept. LSH can miss a
pair just above the threshold (its false negatives); it never drops a pair below it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SHINGLE = 5  # characters per shingle: suits short instructions and answers
NUM_PERM = 128
SEED = 1  # MinHash permutations; fixed, so the same rows give the same signatures


def normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_duplicates(texts: list[str]) -> dict[int, int]:
    """``{row: the first earlier row with the same text}``."""
    first: dict[str, int] = {}
    found = {}
    for i, text in enumerate(texts):
        key = normalised(text)
        if key in first:
            found[i] = first[key]
        else:
            first[key] = i
    return found


def shingles(text: str, n: int = SHINGLE) -> set[str]:
    t = normalised(text.lower())
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class NearDuplicate:
    of: int  # the earlier row it repeats
    similarity: float  # Jaccard similarity of their 5-gram sets


def _datasketch():
    try:
        import datasketch
    except ImportError:
        from polmctl.errors import CommandError

        raise CommandError(
            "near-duplicate detection needs datasketch: pip install 'polmctl[data]' (or pip install datasketch)"
        ) from None
    return datasketch


def near_duplicates(
    texts: list[str], threshold: float, *, skip: set[int] = frozenset(), num_perm: int = NUM_PERM
) -> dict[int, NearDuplicate]:
    """``{row: NearDuplicate}`` for every row whose 5-gram Jaccard similarity with an earlier kept
    row is at least ``threshold``; rows in ``skip`` (already dropped) are neither checked nor kept."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ds = _datasketch()
    sets = [shingles(t) for t in texts]
    signatures = ds.MinHash.bulk([[s.encode() for s in sorted(x)] for x in sets], num_perm=num_perm, seed=SEED)
    lsh = ds.MinHashLSH(threshold=threshold, num_perm=num_perm)
    found = {}
    for i, sig in enumerate(signatures):
        if i in skip:
            continue
        matches = [(j, jaccard(sets[i], sets[j])) for j in lsh.query(sig)]
        matches = sorted((j, s) for j, s in matches if s >= threshold)
        if matches:
            found[i] = NearDuplicate(*matches[0])
        else:
            lsh.insert(i, sig)
    return found
