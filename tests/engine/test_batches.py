"""Engine pieces: batch order, schedule, checkpoint atomicity and rotation."""

from __future__ import annotations

import pytest

from polmctl.engine.batches import BatchSampler, on_every_rank

pytestmark = pytest.mark.unit


def test_batch_sampler_is_seeded_covers_each_epoch_and_resumes():
    a = BatchSampler(10, 3, seed=1)
    first_epoch = [a.next() for _ in range(3)]
    flat = sum(first_epoch, [])
    assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)  # 3 full batches, last partial dropped
    assert first_epoch == [BatchSampler(10, 3, seed=1).next() for _ in range(1)] + first_epoch[1:]
    assert BatchSampler(10, 3, seed=2).next() != first_epoch[0] or BatchSampler(10, 3, seed=3).next() != first_epoch[0]
    state = a.state_dict()
    upcoming = [a.next() for _ in range(4)]
    b = BatchSampler(10, 3, seed=1)
    b.load_state_dict(state)
    assert [b.next() for _ in range(4)] == upcoming
    assert a.epoch >= 1


def test_batch_sampler_shards_ranks_disjointly():
    r0 = BatchSampler(12, 2, seed=0, rank=0, world_size=2)
    r1 = BatchSampler(12, 2, seed=0, rank=1, world_size=2)
    for _ in range(3):
        assert not set(r0.next()) & set(r1.next())


def test_batch_sampler_rejects_too_few_rows():
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchSampler(3, 4, seed=0)


def test_upcoming_rows_are_the_rows_the_next_batches_take_and_do_not_move_the_sampler():
    from polmctl.engine.batches import BatchSampler

    sampler = BatchSampler(10, 3, seed=1)
    sampler.next()
    upcoming = sampler.upcoming(4)  # crosses into the second epoch
    state = sampler.state_dict()
    taken = {i for _ in range(4) for i in sampler.next()}
    assert upcoming == sorted(taken) and state == {"epoch": 0, "cursor": 3}


def test_in_one_process_every_rank_is_this_one():
    """Several ranks agreeing (online DPO, rejection sampling resampling together) runs in
    tests/recipes/test_sharded.py under ZeRO-3."""
    assert on_every_rank(True) is True and on_every_rank(False) is False
