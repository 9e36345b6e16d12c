"""Shared pieces of every solver: the result type, the step callback, NFE accounting, AFS, thresholding.

Conventions (k-diffusion's shape, EDM's notation):
- ``solver(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False,
  return_trajectory=False, callback=None, **solver_options) -> SolveResult``
- ``x`` is the state at ``sigmas[0]`` (e.g. ``noise * sigmas[0]``); ``sigmas`` is a decreasing
  1-D grid (see :mod:`amed_core.schedules`). Step arithmetic runs in ``x.dtype``.
- No ``torch.no_grad`` inside: callers decide (AMED training backpropagates through steps).
- ``nfe`` counts denoiser evaluations exactly; AFS replaces the first one with
  ``d = x / sqrt(1 + sigma^2)`` and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..schedules import check_grid

__all__ = ["SolveResult", "StepInfo", "Counter", "COMMON_OPTIONS", "afs_direction", "dynamic_threshold", "prepare", "finish",
           "check_int_option", "check_thresholding", "direction", "multistep_order", "push", "times_shape"]

# Keyword options every solver takes (the rest of a solver's keyword-only parameters are its own options).
COMMON_OPTIONS = ("class_labels", "afs", "denoise_to_zero", "return_trajectory", "callback")


@dataclass
class SolveResult:
    """Output of one solver run: the final state, optionally every state, and the NFE spent."""

    x: torch.Tensor
    nfe: int
    trajectory: Optional[torch.Tensor] = None  # (num_steps [+1 with denoise_to_zero], *x.shape)


@dataclass
class StepInfo:
    """What a callback sees after each step (i counts steps from 0)."""

    i: int
    t_cur: float
    t_next: float
    x: torch.Tensor
    denoised: Optional[torch.Tensor]
    nfe: int


Callback = Callable[[StepInfo], None]


class Counter:
    """Wraps a denoiser call so that every evaluation is counted (sigma may be per-sample)."""

    def __init__(self, denoiser, class_labels=None):
        self.denoiser = denoiser
        self.class_labels = class_labels
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, self.class_labels)


def afs_direction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Analytical first step (AMED paper, sec. 4): d = x / sqrt(1 + t^2), i.e. D(x; t) ~= x / (1 + t^2)."""
    return x / torch.sqrt(1 + t * t)


def direction(D: Counter, x: torch.Tensor, t: torch.Tensor, t_value: float, use_afs: bool):
    """``(d, denoised)``: the ODE direction d = (x - D(x; t)) / t at the state ``x`` (``t_value``: t as a float), or,
    with ``use_afs`` (the first step with AFS), d = x / sqrt(1 + t^2) without an evaluation (denoised None)."""
    if use_afs:
        return afs_direction(x, t), None
    denoised = D(x, t)
    return (x - denoised) / t_value, denoised


def push(history: list, value, keep: int) -> None:
    """Append ``value`` to a multistep history (newest last), keeping the newest ``keep`` entries (0: none)."""
    if keep > 0:
        history.append(value)
        if len(history) > keep:
            history.pop(0)


def dynamic_threshold(x0: torch.Tensor, p: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding, as in the reference: s = max(1, quantile_p |x0|) per sample; clamp(x0, -s, s) / s."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), p, dim=1)
    s = torch.clamp(s, min=1.0).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.clamp(x0, -s, s) / s


def prepare(x: torch.Tensor, sigmas) -> torch.Tensor:
    """Validate the grid and return it as a tensor in x's dtype and device."""
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError("x must be a batched tensor (B, ...) holding the state at sigmas[0]")
    sigmas = check_grid(torch.as_tensor(sigmas, dtype=torch.float64))
    return sigmas.to(dtype=x.dtype, device=x.device)


def finish(x: torch.Tensor, states: list[torch.Tensor] | None, counter: Counter, denoise_to_zero: bool, t_last: torch.Tensor,
           return_trajectory: bool) -> SolveResult:
    """Optional final denoising x <- D(x; t_last), then package the result."""
    if denoise_to_zero:
        x = counter(x, t_last)
        if states is not None:
            states.append(x)
    traj = torch.stack(states) if return_trajectory and states is not None else None
    return SolveResult(x=x, nfe=counter.nfe, trajectory=traj)


def check_int_option(name: str, value, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not (lo <= value <= hi):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_thresholding(dynamic_thresholding, predict_x0) -> bool:
    """Whether to threshold data predictions: ``dynamic_thresholding`` None follows ``predict_x0`` (the reference)."""
    if dynamic_thresholding is None:
        return bool(predict_x0)
    if not isinstance(dynamic_thresholding, bool):
        raise ValueError(f"dynamic_thresholding must be True, False or None (= follow predict_x0), got {dynamic_thresholding!r}")
    if dynamic_thresholding and not predict_x0:
        raise ValueError("dynamic_thresholding clamps data predictions: it needs predict_x0=True (or set it False)")
    return dynamic_thresholding


def multistep_order(step: int, num_steps: int, max_order: int, lower_order_final: bool) -> int:
    """The reference's order of step ``step`` (from 0) of a multistep method on ``num_steps`` points: warm up
    1, 2, .. (steps with ``step + 1 < max_order``); with ``lower_order_final`` also ramp down so the last step is
    first order (``min(max_order, num_steps - step - 1)`` once warmed up). DPM-Solver++, UniPC and the
    AMED-Plugin on DPM-Solver++ (on its refined grid) share it."""
    if lower_order_final:
        return step + 1 if step + 1 < max_order else min(max_order, num_steps - (step + 1))
    return min(max_order, step + 1)


def times_shape(ts: list) -> tuple[tuple, torch.device]:
    """The shape per-sample step weights take: ``(B,)`` when any time is a tensor with B > 1 entries, else ``()``."""
    n = max(int(t.numel()) for t in ts)
    device = next((t.device for t in ts if t.numel() == n), ts[0].device)
    return ((n,) if n > 1 or any(t.ndim for t in ts) else ()), device
