"""Sequential curriculum sampler: the data's order is the curriculum, so it is never shuffled.

Global batch k (optimizer step k) covers rows [k*G, (k+1)*G) of an epoch, in order. With W
data-parallel ranks, rank r takes the contiguous share [k*G + r*G/W, k*G + (r+1)*G/W) and
cuts it into micro-batches of M pairs; G/(W*M) micro-batches are accumulated per step, so the
global batch and the order are the same for any world size. Resuming is a step count: step k
always maps to the same rows. Epochs repeat the same order.

The last global batch of an epoch usually holds fewer than G rows. The MixDPO authors'
trainer keeps it (in an easy-first order those are the hardest pairs), and so does this
sampler by default: a smaller final step whose loss is still the mean over its pairs
(`Step.pairs` says how many there are). Its rows are shared out as evenly as the ranks allow;
every rank runs the same number of micro-batches (FSDP's collectives need that), and a rank
with fewer rows gets empty micro-batches, which the trainer runs with weight 0. With
`drop_last=True` the incomplete batch is skipped instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Step:
    """One optimizer step on one rank: its index, the row indices of each micro-batch (an
    empty list is a stand-in that carries no pairs) and the pairs of the whole step over all
    ranks (the loss is the mean over them)."""
    index: int
    micro_batches: list
    pairs: int


class CurriculumSampler:
    """Row indices of every step and micro-batch, for one data-parallel rank.

    Args:
        num_rows: rows in the (ordered) training data.
        global_batch_size: G, pairs per optimizer step over all ranks.
        micro_batch_size: M, pairs per forward pass on one rank.
        world_size, rank: data-parallel layout.
        num_epochs: passes over the data (ignored when max_steps > 0).
        max_steps: total optimizer steps when > 0 (wraps into further epochs if needed).
        start_step: first step `__iter__` yields (resume).
        drop_last: skip each epoch's last incomplete global batch (default: keep it).
    """

    def __init__(self, num_rows: int, global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, num_epochs: int = 1, max_steps: int = 0,
                 start_step: int = 0, drop_last: bool = False):
        if global_batch_size < 1 or micro_batch_size < 1:
            raise ValueError("global_batch_size and per_device_train_batch_size must be positive")
        if global_batch_size % (world_size * micro_batch_size):
            raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of "
                             f"ranks x per_device_train_batch_size = {world_size} x "
                             f"{micro_batch_size}")
        if num_rows < (global_batch_size if drop_last else 1):
            raise ValueError(f"the data has {num_rows} pairs, fewer than one global batch "
                             f"(global_batch_size={global_batch_size}) with drop_last")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_rows, self.global_batch_size = num_rows, global_batch_size
        self.micro_batch_size, self.world_size, self.rank = micro_batch_size, world_size, rank
        self.drop_last = drop_last
        self.steps_per_epoch = num_rows // global_batch_size if drop_last \
            else math.ceil(num_rows / global_batch_size)
        self.total_steps = max_steps if max_steps > 0 else self.steps_per_epoch * num_epochs
        if self.total_steps < 1:
            raise ValueError("no training steps: set num_train_epochs >= 1 or max_steps > 0")
        self.start_step = start_step

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank (of a full global batch)."""
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    @property
    def dropped_rows_per_epoch(self) -> int:
        return self.num_rows - self.steps_per_epoch * self.global_batch_size if self.drop_last \
            else 0

    @property
    def last_batch_rows(self) -> int:
        """Rows of each epoch's last global batch (G when it is full)."""
        if self.drop_last:
            return self.global_batch_size
        return self.num_rows - (self.steps_per_epoch - 1) * self.global_batch_size

    def step(self, index: int) -> Step:
        """This rank's share of global batch `index` (0-based), as micro-batches."""
        start = (index % self.steps_per_epoch) * self.global_batch_size
        pairs = min(self.global_batch_size, self.num_rows - start)
        # Contiguous shares, as even as possible (the first ranks take one more row).
        base, extra = divmod(pairs, self.world_size)
        first = start + self.rank * base + min(self.rank, extra)
        rows = list(range(first, first + base + (self.rank < extra)))
        size = self.micro_batch_size
        count = math.ceil(math.ceil(pairs / self.world_size) / size)  # the same on every rank
        micro_batches = [rows[i * size:(i + 1) * size] for i in range(count)]
        return Step(index, micro_batches, pairs)

    def micro_batches(self, index: int) -> list[list[int]]:
        return self.step(index).micro_batches

    def __iter__(self) -> Iterator[Step]:
        """The Steps from start_step to total_steps - 1."""
        for index in range(self.start_step, self.total_steps):
            yield self.step(index)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def state_dict(self) -> dict:
        return {"start_step": self.start_step, "num_rows": self.num_rows,
                "global_batch_size": self.global_batch_size, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints from before drop_last existed dropped the last batch.
        state = {"drop_last": True, **state}
        for key in ("num_rows", "global_batch_size", "drop_last"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the checkpoint was made with {key}="
                                 f"{state[key]}, this run has {getattr(self, key)}")
        self.start_step = state["start_step"]
