"""Deterministic train/test partition for generated data.

Each generated item has an identity (e.g. the operands and operators of a problem). Its
split is a function of a stable hash of that identity alone (sha256, not Python's salted
``hash``), so the test split never overlaps the training split, whatever the sizes or
seeds asked for, and the partition is the same on every machine and Python version.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Hashable

from polmctl.errors import DataError

TEST_FRACTION = 0.15
SPLITS = ("train", "test")
# Consecutive duplicate / other-split draws after which the option space counts as exhausted.
MAX_MISSES = 20_000
# Consecutive misses after which a row may repeat an identity already drawn (in other words).
FRESH_TRIES = 30


def split_of(identity: Hashable) -> str:
    """ "train" or "test" for an item identity (a tuple of str/int)."""
    digest = hashlib.sha256(repr(identity).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def check_int(name: str, option: str, value: object, minimum: int) -> int:
    """A generator option that must be an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(
            f"builtin:{name} option {option}={value!r}: use an integer >= {minimum} (data.options.{option})"
        )
    return value


def sample_split(
    split: str,
    n: int,
    seed: int,
    draw: Callable[[random.Random], tuple[Hashable, dict]],
    *,
    name: str,
    identity: Callable[[Hashable], Hashable] = lambda key: key,
) -> list[dict]:
    """Draw rows until ``n`` distinct ones of ``split`` are found (seeded, per split).

    ``draw`` returns (key, row); rows are distinct by key, and the split is decided by
    ``identity(key)`` (e.g. the numbers of a problem but not its wording, so a test
    problem never appears in training in other words). New identities are preferred:
    an identity repeats (in other words) only once fresh ones have become hard to find,
    so a small evaluation set asks mostly different problems.
    """
    if split not in SPLITS:
        raise DataError(f"builtin:{name} has splits {', '.join(SPLITS)}, not {split!r} (data.split / data.eval_split)")
    check_int(name, "n", n, 1)
    check_int(name, "seed", seed, 0)
    # A string seed is hashed with sha512 by `random`, so it is stable across processes.
    rng = random.Random(f"{name}:{split}:{seed}")
    rows, seen, seen_identities, misses = [], set(), set(), 0
    while misses < MAX_MISSES:
        key, row = draw(rng)
        ident = identity(key)
        repeat = ident in seen_identities and misses < FRESH_TRIES
        if repeat or key in seen or split_of((name, ident)) != split:
            misses += 1
            continue
        seen.add(key)
        seen_identities.add(ident)
        rows.append(row)
        misses = 0
        if len(rows) == n:
            return rows
    raise DataError(
        f"builtin:{name}: only {len(rows)} distinct {split} rows exist with these options "
        f"(asked for n={n}); lower data.options.n or widen the options"
    )
