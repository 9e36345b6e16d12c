"""Reading teacher shards: the union grid's states at one student's grid, as :class:`TeacherBatch` es."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..schedules import grid_indices
from ..shards import TeacherShard

__all__ = ["TeacherBatch", "student_indices", "batch_dtype", "shard_to_batches"]


@dataclass
class TeacherBatch:
    """Noise, labels and teacher states at the student's grid.

    noise: (B, C, H, W) standard normal draws; the trajectory starts at noise * sigmas[0].
    class_labels: (B, label_dim) one-hot labels or None.
    states: (N, B, C, H, W) teacher states at the student's N grid points; states[0] = noise * sigmas[0].
    """

    noise: torch.Tensor
    class_labels: Optional[torch.Tensor]
    states: torch.Tensor

    def __post_init__(self):
        if self.states.ndim != self.noise.ndim + 1 or self.states.shape[1:] != self.noise.shape:
            raise ValueError(f"states must be (N, *noise.shape); got states {tuple(self.states.shape)}, noise {tuple(self.noise.shape)}")


def student_indices(union_sigmas: torch.Tensor, student_sigmas: torch.Tensor) -> torch.Tensor:
    """Positions of a student's times in the stored union grid (ValueError when one is not an exact point,
    or when the student does not start at the union's first time, where states[0] = noise * sigma_max)."""
    idx = grid_indices(union_sigmas, student_sigmas)
    if int(idx[0]) != 0:
        raise ValueError(f"the student grid starts at sigma {float(student_sigmas[0]):.6g}, the teacher at "
                         f"{float(union_sigmas[0]):.6g}: stored trajectories start at the teacher's sigma_max")
    return idx


def batch_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of TeacherBatches read from storage of dtype ``stored``: ``dtype``, else the storage dtype with
    half types widened to float32."""
    if dtype is not None:
        return dtype
    return torch.float32 if stored in (torch.float16, torch.bfloat16) else stored


def shard_to_batches(shard: TeacherShard, student_sigmas: torch.Tensor, *, batch_size: int | None = None,
                     dtype: torch.dtype | None = None) -> Iterator[TeacherBatch]:
    """TeacherBatches of a shard at a student's grid, in stored order (states[0] = stored noise * sigma_max).

    dtype: output dtype (default: the storage dtype, half types widened to float32).
    """
    idx = student_indices(shard.sigmas, student_sigmas)
    out = batch_dtype(shard.noise.dtype, dtype)
    noise = shard.noise.to(out)
    states = shard.states[idx].to(out)
    states[0] = noise * shard.sigmas[0].to(out)  # the contract: states[0] = noise * sigmas[0], exactly
    labels = shard.one_hot_labels(out)
    B = shard.num_samples
    batch_size = B if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for lo in range(0, B, batch_size):
        sl = slice(lo, min(B, lo + batch_size))
        yield TeacherBatch(noise=noise[sl], class_labels=None if labels is None else labels[sl], states=states[:, sl])
