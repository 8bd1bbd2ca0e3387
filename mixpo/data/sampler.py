"""Sequential curriculum sampler: the data's order is the curriculum, so it is never shuffled.

Global batch k (optimizer step k) covers rows [k*G, (k+1)*G) of an epoch, in order. With W
data-parallel ranks, rank r takes the contiguous share [k*G + r*G/W, k*G + (r+1)*G/W) and
cuts it into micro-batches of M pairs; G/(W*M) micro-batches are accumulated per step, so the
global batch and the order are the same for any world size. Resuming is a step count: step k
always maps to the same rows. Epochs repeat the same order; the last G-incomplete global batch
of an epoch is dropped (every step sees exactly G pairs).
"""
from __future__ import annotations

from typing import Iterator


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
    """

    def __init__(self, num_rows: int, global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, num_epochs: int = 1, max_steps: int = 0,
                 start_step: int = 0):
        if global_batch_size < 1 or micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be positive")
        if global_batch_size % (world_size * micro_batch_size):
            raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of "
                             f"world_size * micro_batch_size = {world_size} * {micro_batch_size}")
        if num_rows < global_batch_size:
            raise ValueError(f"the data has {num_rows} pairs, fewer than one global batch "
                             f"(global_batch_size={global_batch_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_rows, self.global_batch_size = num_rows, global_batch_size
        self.micro_batch_size, self.world_size, self.rank = micro_batch_size, world_size, rank
        self.steps_per_epoch = num_rows // global_batch_size
        self.total_steps = max_steps if max_steps > 0 else self.steps_per_epoch * num_epochs
        if self.total_steps < 1:
            raise ValueError("no training steps: set num_epochs >= 1 or max_steps > 0")
        self.start_step = start_step

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    @property
    def dropped_rows_per_epoch(self) -> int:
        return self.num_rows - self.steps_per_epoch * self.global_batch_size

    def rank_rows(self, step: int) -> list[int]:
        """This rank's contiguous share of global batch `step` (0-based), G/W row indices."""
        share = self.global_batch_size // self.world_size
        start = (step % self.steps_per_epoch) * self.global_batch_size + self.rank * share
        return list(range(start, start + share))

    def micro_batches(self, step: int) -> list[list[int]]:
        """The rank's share of step `step` cut into `accumulation_steps` lists of M indices."""
        rows = self.rank_rows(step)
        size = self.micro_batch_size
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def __iter__(self) -> Iterator[tuple[int, list[list[int]]]]:
        """(step, micro-batches) from start_step to total_steps - 1."""
        for step in range(self.start_step, self.total_steps):
            yield step, self.micro_batches(step)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def state_dict(self) -> dict:
        return {"start_step": self.start_step, "num_rows": self.num_rows,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_rows", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the checkpoint was made with {key}="
                                 f"{state[key]}, this run has {getattr(self, key)}")
        self.start_step = state["start_step"]
