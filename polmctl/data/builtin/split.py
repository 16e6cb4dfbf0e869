"""Deterministic train/test partition for generated data.

Each generated item has an identity (e.g. the operands and operator). Its split is a
function of a stable hash of that identity alone, so the test split never overlaps the
training split, whatever the sizes or seeds asked for.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Hashable

TEST_FRACTION = 0.15
SPLITS = ("train", "test")


def split_of(identity: Hashable) -> str:
    digest = hashlib.sha256(repr(identity).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION else "train"


def sample_split(split: str, n: int, seed: int, draw: Callable[[random.Random], tuple[Hashable, dict]],
                 *, name: str, identity: Callable[[Hashable], Hashable] = lambda key: key,
                 max_tries: int = 200) -> list[dict]:
    """Draw rows until ``n`` distinct ones of ``split`` are found (seeded, per split).

    ``draw`` returns (key, row); rows are distinct by key, and the split is decided by
    ``identity(key)`` (e.g. the numbers of a problem but not its wording).
    """
    from polmctl.data.errors import DataError

    if split not in SPLITS:
        raise DataError(f"builtin:{name} has splits {', '.join(SPLITS)}, not {split!r}")
    rng = random.Random(f"{name}:{split}:{seed}")
    rows, seen = [], set()
    for _ in range(n * max_tries):
        key, row = draw(rng)
        if key in seen or split_of((name, identity(key))) != split:
            continue
        seen.add(key)
        rows.append(row)
        if len(rows) == n:
            return rows
    raise DataError(f"builtin:{name}: only {len(rows)} distinct {split} rows exist with these options "
                    f"(asked for {n}); lower n or widen the options (e.g. max_operand)")
