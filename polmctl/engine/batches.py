"""Which rows go into which micro-batch: seeded, epoch after epoch, resumable.

Kept by hand rather than in a torch DataLoader because resuming needs the exact data
position (epoch, cursor) in the checkpoint, and a DataLoader's sampler state is not
serialisable. With several processes each rank takes its own slice of every global
micro-batch, so ranks never see the same row in a step.
"""

from __future__ import annotations

import torch

from polmctl.errors import DataError


class BatchSampler:
    def __init__(
        self, n_rows: int, micro_batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        self.global_batch = micro_batch_size * world_size
        if n_rows < self.global_batch:
            raise DataError(
                f"the training data has {n_rows} rows, fewer than one micro-batch across processes "
                f"({micro_batch_size} x {world_size}); lower trainer.micro_batch_size (online methods: the prompts "
                "per step or round), use fewer processes, or add rows"
            )
        self.n_rows, self.micro_batch_size = n_rows, micro_batch_size
        self.seed, self.shuffle, self.rank = seed, shuffle, rank
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_rows))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n_rows, generator=gen).tolist()

    def next(self) -> list[int]:
        """Row indices of this rank's next micro-batch (the last partial batch of an epoch is dropped)."""
        if self.cursor + self.global_batch > self.n_rows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        chunk = self._order[self.cursor : self.cursor + self.global_batch]
        self.cursor += self.global_batch
        start = self.rank * self.micro_batch_size
        return chunk[start : start + self.micro_batch_size]

    def upcoming(self, n_micro_batches: int) -> list[int]:
        """The distinct rows this rank's next ``n_micro_batches`` will hold, without moving on."""
        state, order = self.state_dict(), self._order
        rows = {i for _ in range(n_micro_batches) for i in self.next()}
        self.epoch, self.cursor, self._order = state["epoch"], state["cursor"], order
        return sorted(rows)

    @property
    def progress_epochs(self) -> float:
        return self.epoch + self.cursor / self.n_rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()


class BatchSource:
    """Where the trainer takes each optimizer step's micro-batches from.

    ``next_step(model)`` returns the step's micro-batches and any metrics their making produced
    (an online method's rollout: rewards, timing). The data position is ``sampler`` plus the
    attributes named in ``counters`` (rollouts or rounds done), saved in every checkpoint and
    restored on resume; a resumed online method starts a fresh rollout where its prompts left off.
    """

    sampler: BatchSampler
    counters: tuple[str, ...] = ()
    micro_batch_size: int

    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        raise NotImplementedError

    def halve_micro_batch(self) -> list[dict]:
        """trainer.auto_batch after an out-of-memory error: this step's rows again in micro-batches
        half as large. Only sources whose rows are fixed examples can do it."""
        raise ValueError(f"{type(self).__name__} cannot re-split a step's batches")

    @property
    def can_halve(self) -> bool:
        return type(self).halve_micro_batch is not BatchSource.halve_micro_batch

    @property
    def progress_epochs(self) -> float:
        return self.sampler.progress_epochs

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), **{name: getattr(self, name) for name in self.counters}}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        for name in self.counters:
            setattr(self, name, state.get(name, 0))


def on_every_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (``flag`` itself in one). An online batch source that
    samples again until it has enough decides with the other ranks: under ZeRO-3 and FSDP each
    generate() is a collective, so a rank sampling once more alone would hang the others."""
    return fewest_on_any_rank(int(flag)) == 1


def fewest_on_any_rank(count: int) -> int:
    """The smallest ``count`` over the processes (``count`` itself in one). A batch source whose ranks
    keep different numbers of rows trims each to this, so every rank runs as many micro-batches: each
    backward of DDP, FSDP and ZeRO is a collective."""
    from accelerate import PartialState
    from accelerate.utils import reduce

    state = PartialState()
    if state.num_processes == 1:
        return count
    return int(-reduce(torch.tensor(-float(count), device=state.device), reduction="max").item())


class OfflineBatches(BatchSource):
    """A fixed, encoded dataset served in seeded epochs: each step, ``grad_accum`` collated
    micro-batches. Online methods give the trainer their own BatchSource, which makes its
    batches by sampling the model."""

    def __init__(self, examples, collate, micro_batch_size: int, grad_accum: int, **sampler_options):
        self.examples, self.collate, self.grad_accum = examples, collate, grad_accum
        self.sampler = BatchSampler(len(examples), micro_batch_size, **sampler_options)
        # Rows per forward pass; trainer.auto_batch lowers it, the sampler's order stays.
        self.micro_batch_size = micro_batch_size
        self._step_rows: list[int] = []

    def next_step(self, model) -> tuple[list[dict], dict[str, float]]:
        """The step's micro-batches and any metrics their making produced (none here)."""
        self._step_rows = [i for _ in range(self.grad_accum) for i in self.sampler.next()]
        return self._collate_step(), {}

    def halve_micro_batch(self) -> list[dict]:
        """The same step's rows again, in micro-batches half as large (twice as many), so the
        global batch is unchanged."""
        if self.micro_batch_size == 1:
            raise ValueError("a micro-batch of one row does not fit in memory")
        self.micro_batch_size = (self.micro_batch_size + 1) // 2
        return self._collate_step()

    def _collate_step(self) -> list[dict]:
        rows, size = self._step_rows, self.micro_batch_size
        return [self.collate([self.examples[i] for i in rows[s : s + size]]) for s in range(0, len(rows), size)]
