"""How curved a teacher's sampling trajectories are: the trajectory deviation of Chen et al. (ICML 2024, "On the
Trajectory Regularity of ODE-based Diffusion Sampling", the GITS paper, Sec. 3).

For one trajectory x(sigma_0 = sigma_max) .. x(sigma_{G-1} = sigma_min), the deviation of the point x_i is its distance
to the straight line through the two ends: ``|| (x_i - x_0) - ((x_i - x_0) . u) u ||``, ``u = (x_{G-1} - x_0) /
||x_{G-1} - x_0||``. The paper plots it against time and finds a small "boomerang" bump; we report it per dimension
(divided by sqrt(D), comparable with a pixel value) and relative to the length of the line ||x_{G-1} - x_0||, the
scale-free number (0: a straight trajectory, which one Euler step would solve exactly).
"""

from __future__ import annotations

import torch

__all__ = ["trajectory_deviation", "deviation_summary"]


def trajectory_deviation(trajectory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(deviation (G, B) per dimension, line length (B,) per dimension) of trajectories (G, B, ...)."""
    t = trajectory.to(torch.float64).reshape(trajectory.shape[0], trajectory.shape[1], -1)
    d = t.shape[-1]
    rel = t - t[0:1]
    line = t[-1] - t[0]
    length = line.norm(dim=-1)
    u = line / length.clamp_min(1e-300)[:, None]
    along = (rel * u[None]).sum(-1, keepdim=True)
    dev = (rel - along * u[None]).norm(dim=-1)
    return dev / d ** 0.5, length / d ** 0.5


def deviation_summary(trajectory: torch.Tensor, sigmas: torch.Tensor) -> dict:
    """Per-sample maximum deviation (per dimension and relative to the line's length): median and p90 over samples,
    and the median sigma where the maximum sits."""
    dev, length = trajectory_deviation(trajectory)
    mx, arg = dev.max(dim=0)
    rel = mx / length
    q = torch.tensor([0.5, 0.9], dtype=torch.float64)
    a, r = torch.quantile(mx, q), torch.quantile(rel, q)
    at = torch.as_tensor(sigmas, dtype=torch.float64)[arg]
    return {"max_dev_p50": float(a[0]), "max_dev_p90": float(a[1]), "max_dev_rel_p50": float(r[0]),
            "max_dev_rel_p90": float(r[1]), "sigma_at_max_p50": float(torch.quantile(at, 0.5)),
            "line_length_p50": float(torch.quantile(length, 0.5)), "num_samples": int(dev.shape[1])}
