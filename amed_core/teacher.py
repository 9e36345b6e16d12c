"""Teacher trajectories: what a student trains against.

`TeacherBatch` is the unit the AMED training loop consumes, whether the teacher runs on the fly
(the reference's way) or is streamed from stored shards (`flows.store`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["TeacherBatch"]


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
