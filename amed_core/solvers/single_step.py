"""Single-step solvers: Euler (DDIM), Heun (EDM), DPM-Solver-2."""

from __future__ import annotations

import torch

from ._common import Callback, Counter, SolveResult, StepInfo, direction, finish, prepare


def euler(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
          callback: Callback | None = None) -> SolveResult:
    """Euler's method on dx/dt = (x - D(x; t)) / t, equivalent to DDIM (Song et al. 2021)."""
    t_steps = prepare(x, sigmas)
    ts = t_steps.tolist()                       # step sizes as Python floats: no per-step scalar kernels
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    x_next = x
    for i in range(len(ts) - 1):
        x_cur, t_cur, t_next = x_next, ts[i], ts[i + 1]
        d_cur, denoised = direction(D, x_cur, t_steps[i], t_cur, afs and i == 0)
        x_next = torch.add(x_cur, d_cur, alpha=t_next - t_cur)          # x_cur + (t_next - t_cur) d_cur
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, t_cur, t_next, x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)


def heun(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
         callback: Callback | None = None) -> SolveResult:
    """Heun's 2nd-order method (EDM, Karras et al. 2022, Alg. 1 without churn); 2 NFE per step."""
    t_steps = prepare(x, sigmas)
    ts = t_steps.tolist()
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    x_next = x
    for i in range(len(ts) - 1):
        x_cur, t_cur, t_next = x_next, ts[i], ts[i + 1]
        h = t_next - t_cur
        # Euler predictor.
        d_cur, denoised = direction(D, x_cur, t_steps[i], t_cur, afs and i == 0)
        x_next = torch.add(x_cur, d_cur, alpha=h)
        # Trapezoidal corrector: x_cur + h (d_cur + d_prime) / 2.
        denoised = D(x_next, t_steps[i + 1])
        d_prime = (x_next - denoised) / t_next
        x_next = torch.add(x_cur, d_cur + d_prime, alpha=0.5 * h)
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, t_cur, t_next, x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)


def dpm2(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
         callback: Callback | None = None, r: float = 0.5) -> SolveResult:
    """DPM-Solver-2 (Lu et al. 2022, arXiv 2206.00927) in EDM's sigma form, 2 NFE per step.

    Euler to t_mid = t_next^r * t_cur^(1-r) (geometric interpolation, r = 0.5 is the midpoint in
    log sigma), then x_next = x_cur + (t_next - t_cur) * ((1 - 1/(2r)) d_cur + 1/(2r) d_mid).
    """
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < float(r) <= 1.0):
        raise ValueError(f"r must be a number in (0, 1] (the intermediate point's position), got {r!r}")
    r = float(r)
    t_steps = prepare(x, sigmas)
    ts = t_steps.tolist()
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    w_mid = 1.0 / (2.0 * r)
    t_mids = (t_steps[1:] ** r) * (t_steps[:-1] ** (1.0 - r))      # all intermediate times at once
    tm = t_mids.tolist()
    x_next = x
    for i in range(len(ts) - 1):
        x_cur, t_cur, t_next = x_next, ts[i], ts[i + 1]
        # Euler step to the intermediate time.
        d_cur, denoised = direction(D, x_cur, t_steps[i], t_cur, afs and i == 0)
        t_mid = tm[i]
        x_mid = torch.add(x_cur, d_cur, alpha=t_mid - t_cur)
        # Second-order correction from the slope at t_mid.
        denoised = D(x_mid, t_mids[i])
        d_mid = (x_mid - denoised) / t_mid
        h = t_next - t_cur
        x_next = torch.add(torch.add(x_cur, d_cur, alpha=h * (1.0 - w_mid)), d_mid, alpha=h * w_mid)
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, t_cur, t_next, x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)
