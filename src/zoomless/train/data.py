"""The order in which a run visits its samples: reshuffled every epoch, resumable to the sample,
sliced between processes."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch


class DataIterator:
    """Endless batches of sample indices, reshuffled every epoch from (seed, epoch).

    The whole state is (epoch, position), so saving and restoring it resumes the exact order.
    With several processes each one draws the same global batch and keeps its own contiguous slice
    (`shard`): the union over processes is the single-process batch, and the state stays global.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if n_items < 1:
            raise ValueError("DataIterator needs at least one item")
        self.n_items, self.batch_size, self.seed, self.shuffle = n_items, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """From now on `next_batch` gives process `rank`'s slice of each global batch of `world`."""
        if self.batch_size % world:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of the {world} processes: "
                "each one takes an equal slice"
            )
        self.rank, self.world = rank, world

    @property
    def offset(self) -> int:
        """Where this process's slice starts in the global batch."""
        return self.rank * (self.batch_size // self.world)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_items))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_items, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """This process's slice of the next global batch (all of it on one process)."""
        batch = self.global_batch()
        return batch[self.offset : self.offset + self.batch_size // self.world]

    def global_batch(self) -> list[int]:
        return self.take(self.batch_size)

    def peek_batch(self) -> list[int]:
        """The indices `next_batch` gives next, the state left exactly as it is (a checkpoint saves
        it): what the next step's prompts are prepared for ahead of time (`step_prompts`)."""
        batch = self.peek_global_batch()
        return batch[self.offset : self.offset + self.batch_size // self.world]

    def peek_global_batch(self) -> list[int]:
        with self.state_kept():
            return self.take(self.batch_size)

    @contextlib.contextmanager
    def state_kept(self) -> Iterator[None]:
        """Draw inside the block as far as you like: the order's state is restored after it."""
        epoch, position = self.epoch, self.position
        try:
            yield
        finally:
            self.epoch, self.position = epoch, position

    def take(self, n: int) -> list[int]:
        """The next `n` indices of the order (more than a batch replace bad samples, `train/screening.py`)."""
        batch: list[int] = []
        order = self._order(self.epoch)
        while len(batch) < n:
            if self.position == self.n_items:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order(self.epoch)
            take = min(n - len(batch), self.n_items - self.position)
            batch.extend(order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
