"""Single-step solvers: Euler (DDIM), Heun (EDM), DPM-Solver-2."""

from __future__ import annotations

import torch

from ._common import Callback, Counter, SolveResult, StepInfo, afs_direction, finish, prepare


def euler(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
          callback: Callback | None = None) -> SolveResult:
    """Euler's method on dx/dt = (x - D(x; t)) / t, equivalent to DDIM (Song et al. 2021)."""
    t_steps = prepare(x, sigmas)
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    x_next = x
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        denoised = None
        if afs and i == 0:
            d_cur = afs_direction(x_cur, t_cur)
        else:
            denoised = D(x_cur, t_cur)
            d_cur = (x_cur - denoised) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, float(t_cur), float(t_next), x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)


def heun(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
         callback: Callback | None = None) -> SolveResult:
    """Heun's 2nd-order method (EDM, Karras et al. 2022, Alg. 1 without churn); 2 NFE per step."""
    t_steps = prepare(x, sigmas)
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    x_next = x
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        denoised = None
        # Euler predictor.
        if afs and i == 0:
            d_cur = afs_direction(x_cur, t_cur)
        else:
            denoised = D(x_cur, t_cur)
            d_cur = (x_cur - denoised) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        # Trapezoidal corrector.
        denoised = D(x_next, t_next)
        d_prime = (x_next - denoised) / t_next
        x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, float(t_cur), float(t_next), x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)
