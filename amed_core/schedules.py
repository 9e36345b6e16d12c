"""Time schedules (sigma grids) in the EDM convention, plus refinement and union of grids.

All grids are float64 tensors, strictly decreasing from sigma_max to sigma_min, of length
``num_steps`` (num_steps - 1 intervals). Solvers never build schedules; callers pass the grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from ._fields import check_fields

__all__ = [
    "SCHEDULE_TYPES",
    "ScheduleSpec",
    "DiscreteVP",
    "get_schedule",
    "polynomial",
    "logsnr",
    "time_uniform",
    "discrete",
    "refine",
    "union",
    "check_grid",
    "schedule_to_sigmas",
]

SCHEDULE_TYPES = ("polynomial", "logsnr", "time_uniform", "discrete")


def _indices(num_steps: int) -> torch.Tensor:
    return torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)


def polynomial(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's schedule: (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho (Karras et al. eq. 5)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + _indices(num_steps) * (b - a)) ** rho


def logsnr(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma (i.e. in logSNR), as recommended by DPM-Solver for small images."""
    lam_min, lam_max = -math.log(sigma_max), -math.log(sigma_min)
    return torch.exp(-(lam_min + _indices(num_steps) * (lam_max - lam_min)))


def time_uniform(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0, eps_s: float = 1e-3) -> torch.Tensor:
    """Uniform in VP time t in [eps_s, 1] (exponent rho) of the VP-SDE whose sigma(t) spans [sigma_min, sigma_max].

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), with beta_d, beta_min fitted so that
    sigma(eps_s) = sigma_min and sigma(1) = sigma_max (the reference's parameterisation).
    """
    beta_d = 2 * (math.log(sigma_min**2 + 1) / eps_s - math.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    t = (1 + _indices(num_steps) * (eps_s ** (1 / rho) - 1)) ** rho
    return torch.sqrt(torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


@dataclass(frozen=True)
class DiscreteVP:
    """A discrete VP time table (e.g. Stable Diffusion's 1000 alphas_cumprod) viewed in continuous time.

    log alpha(t) is piecewise linear in t through t_i = (i + 1) / T (extrapolated with the end segments),
    alpha = sqrt(alphas_cumprod); sigma(t) = sqrt(1 - alpha^2) / alpha. This is DPM-Solver's
    NoiseScheduleVP('discrete') interpolation.
    """

    alphas_cumprod: tuple[float, ...]
    epsilon_t: float = 1e-3

    def __post_init__(self):
        a = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if a.ndim != 1 or a.size < 2 or not np.all((a > 0) & (a < 1)):
            raise ValueError("alphas_cumprod must be a 1-D table of values in (0, 1)")
        if not np.all(np.diff(a) < 0):
            raise ValueError("alphas_cumprod must be strictly decreasing")

    @property
    def _tables(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(self.alphas_cumprod, dtype=np.float64)
        t = np.arange(1, a.size + 1, dtype=np.float64) / a.size
        return t, 0.5 * np.log(a)

    @staticmethod
    def _interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
        """Piecewise-linear interpolation on increasing xp, extrapolating with the end segments."""
        idx = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, xp.size - 2)
        x0, x1, y0, y1 = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
        return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

    def log_alpha(self, t) -> np.ndarray:
        tt, la = self._tables
        return self._interp(np.asarray(t, dtype=np.float64), tt, la)

    def sigma(self, t) -> np.ndarray:
        la = self.log_alpha(t)
        return np.sqrt(np.expm1(-2 * la))

    def sigma_inv(self, sigma) -> np.ndarray:
        """VP time t with sigma(t) = sigma (log alpha = -log(1 + sigma^2) / 2, inverted piecewise linearly)."""
        tt, la = self._tables
        target = -0.5 * np.log1p(np.asarray(sigma, dtype=np.float64) ** 2)
        return self._interp(-target, -la, tt)  # -log alpha is increasing in t

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.epsilon_t))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))


def discrete(num_steps: int, table: DiscreteVP, sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 1.0) -> torch.Tensor:
    """Uniform (exponent rho) in the discrete model's VP time between t(sigma_max) and t(sigma_min), mapped to sigma."""
    sigma_min = table.sigma_min if sigma_min is None else sigma_min
    sigma_max = table.sigma_max if sigma_max is None else sigma_max
    t_min, t_max = float(table.sigma_inv(sigma_min)), float(table.sigma_inv(sigma_max))
    a, b = t_max ** (1 / rho), t_min ** (1 / rho)
    t = (a + _indices(num_steps).numpy() * (b - a)) ** rho
    return torch.from_numpy(table.sigma(t))


@dataclass(frozen=True)
class ScheduleSpec:
    """A serialisable schedule: type, rho, sigma range and (for 'discrete') the VP table."""

    schedule_type: str = "polynomial"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    alphas_cumprod: tuple[float, ...] | None = None
    epsilon_t: float = 1e-3

    def __post_init__(self):
        if self.schedule_type not in SCHEDULE_TYPES:
            raise ValueError(f"schedule_type {self.schedule_type!r} is not one of {SCHEDULE_TYPES}")
        for name in ("sigma_min", "sigma_max", "rho", "epsilon_t"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"schedule {name} must be a finite number, got {v!r}")
        if not (0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"sigma_min ({self.sigma_min}) must be positive and below sigma_max ({self.sigma_max})")
        if self.rho <= 0:
            raise ValueError(f"rho must be positive, got {self.rho}")

        if self.schedule_type == "discrete" and self.alphas_cumprod is None:
            raise ValueError("schedule_type 'discrete' needs alphas_cumprod (the model's VP table)")
        if self.alphas_cumprod is not None:
            if isinstance(self.alphas_cumprod, (str, bytes, dict)) or not 2 <= len(self.alphas_cumprod) <= 100_000:
                raise ValueError("alphas_cumprod must be a list of 2..100000 values (the model's VP table)")
            table = tuple(float(a) for a in self.alphas_cumprod)
            if not all(0 < a <= 1 for a in table):
                raise ValueError("alphas_cumprod values must be finite and in (0, 1] (the model's VP table)")
            object.__setattr__(self, "alphas_cumprod", table)

    def grid(self, num_steps: int) -> torch.Tensor:
        return get_schedule(num_steps, self.sigma_min, self.sigma_max, schedule_type=self.schedule_type,
                            schedule_rho=self.rho, alphas_cumprod=self.alphas_cumprod, epsilon_t=self.epsilon_t)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alphas_cumprod"] = list(self.alphas_cumprod) if self.alphas_cumprod is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleSpec":
        check_fields(cls, d, "schedule")
        return cls(**d)


def get_schedule(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    *,
    schedule_type: str = "polynomial",
    schedule_rho: float = 7.0,
    alphas_cumprod: Sequence[float] | None = None,
    epsilon_t: float = 1e-3,
) -> torch.Tensor:
    """The sigma grid of ``num_steps`` points for a schedule name, in float64."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (got {num_steps!r})")
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"sigma_min ({sigma_min}) must be positive and below sigma_max ({sigma_max})")
    if schedule_type == "polynomial":
        return polynomial(num_steps, sigma_min, sigma_max, schedule_rho)
    if schedule_type == "logsnr":
        return logsnr(num_steps, sigma_min, sigma_max)
    if schedule_type == "time_uniform":
        return time_uniform(num_steps, sigma_min, sigma_max, schedule_rho)
    if schedule_type == "discrete":
        if alphas_cumprod is None:
            raise ValueError("schedule_type 'discrete' needs alphas_cumprod (the model's VP table)")
        return discrete(num_steps, DiscreteVP(tuple(float(a) for a in alphas_cumprod), epsilon_t), sigma_min, sigma_max, schedule_rho)
    raise ValueError(f"schedule_type {schedule_type!r} is not one of {SCHEDULE_TYPES}")


def check_grid(sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a sigma grid: 1-D, at least 2 points, positive, strictly decreasing."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 points (num_steps >= 2), got shape {tuple(sigmas.shape)}")
    if not torch.all(sigmas > 0):
        raise ValueError("sigmas must be positive (use denoise_to_zero for a final step to sigma=0)")
    if not torch.all(sigmas[1:] < sigmas[:-1]):
        raise ValueError("sigmas must be strictly decreasing (from sigma_max to sigma_min)")
    return sigmas


def refine(sigmas: torch.Tensor, M: int, *, space: str = "polynomial", rho: float = 7.0) -> torch.Tensor:
    """Insert M points into every interval of a grid (the teacher's finer grid; original points kept exactly).

    The inserted points are uniform in sigma^(1/rho) within each interval (space='polynomial', the
    reference's choice for rho=7 grids) or in log sigma (space='logsnr').
    """
    sigmas = check_grid(torch.as_tensor(sigmas, dtype=torch.float64))
    if M < 0:
        raise ValueError(f"M (sub-steps per interval) must be >= 0, got {M}")
    if M == 0:
        return sigmas.clone()
    frac = torch.arange(1, M + 1, dtype=torch.float64) / (M + 1)
    pieces = []
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        if space == "polynomial":
            inner = (a ** (1 / rho) + frac * (b ** (1 / rho) - a ** (1 / rho))) ** rho
        elif space == "logsnr":
            inner = torch.exp(a.log() + frac * (b.log() - a.log()))
        else:
            raise ValueError(f"space must be 'polynomial' or 'logsnr', got {space!r}")
        pieces += [a.reshape(1), inner]
    pieces.append(sigmas[-1:])
    return torch.cat(pieces)


def union(*grids: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """Sorted (decreasing) union of several grids, merging points equal within rtol; every input point is kept exactly."""
    if not grids:
        raise ValueError("union needs at least one grid")
    pts = torch.cat([check_grid(torch.as_tensor(g, dtype=torch.float64)) for g in grids])
    pts = torch.sort(pts, descending=True).values
    keep = [pts[0]]
    for p in pts[1:]:
        if abs(float(p) - float(keep[-1])) > rtol * float(keep[-1]):
            keep.append(p)
    return torch.stack(keep)


def grid_indices(fine: torch.Tensor, coarse: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """Indices of each coarse point in a fine grid; ValueError when a point is not an exact grid point."""
    fine = torch.as_tensor(fine, dtype=torch.float64)
    out = []
    for c in torch.as_tensor(coarse, dtype=torch.float64):
        rel = (fine - c).abs() / c
        j = int(torch.argmin(rel))
        if float(rel[j]) > rtol:
            raise ValueError(f"sigma {float(c):.6g} is not a point of the teacher grid (nearest {float(fine[j]):.6g})")
        out.append(j)
    return torch.tensor(out, dtype=torch.long)


def schedule_to_sigmas(t_steps, append_zero: bool = True) -> list[float]:
    """The selected schedule as a plain list of Python floats, decreasing, optionally ending with 0.0.

    This is what diffusers schedulers that take ``sigmas=`` (e.g. ``EulerDiscreteScheduler.set_timesteps(sigmas=...)``,
    which append the final zero themselves: use ``append_zero=False`` there) and k-diffusion samplers
    (``sample_euler(model, x, sigmas)``, which expect the trailing 0) consume.
    """
    t = torch.as_tensor(t_steps, dtype=torch.float64).reshape(-1)
    if t.numel() < 1:
        raise ValueError("t_steps is empty")
    vals = [float(v) for v in t.tolist()]
    if any(not math.isfinite(v) or v <= 0 for v in vals) or any(b >= a for a, b in zip(vals, vals[1:])):
        raise ValueError("t_steps must be positive, finite and strictly decreasing")
    return vals + [0.0] if append_zero else vals
