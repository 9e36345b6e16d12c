"""UniPC (Zhao et al. 2023, arXiv 2302.04867): a unified predictor-corrector, in EDM's sigma form.

Each step predicts x at t_next with the UniP-k multistep update, evaluates the model there once,
and corrects with UniC-k using that evaluation; the evaluation is then reused as the newest
history entry, so a step costs one NFE (the first evaluation at ``sigmas[0]`` is the extra one,
and the final step skips the corrector: NFE = num_steps - 1).

With lambda = -log sigma, h = lambda_t - lambda_0, r_k = (lambda_k - lambda_0) / h and
D1_k = (m_k - m_0) / r_k for the k-th previous model output m_k (m_0 the newest):
  data prediction:  x_t = (t/s_0) x - expm1(-h) m_0 - B(h) sum_k rho_k D1_k,   hh = -h
  noise prediction: x_t = x - t expm1(h) m_0 - t B(h) sum_k rho_k D1_k,        hh = h
where B(h) = hh (bh1) or expm1(hh) (bh2), and rho solves R rho = b with R_ij = r_j^(i-1) and
b_i = i! phi_{i+1}(hh) / B(h) (predictor: the leading (k-1)x(k-1) block, rho = 1/2 for k = 2;
corrector: the full system including the new point r = 1, rho = 1/2 for k = 1).

Departure from UniPC's idea, kept from the diff-solvers reference: during the warm-up (the first
``max_order - 1`` steps, run at increasing order) every step is corrected, the final one included. On grids
with ``N <= max_order`` points the final step is a warm-up step, so the run spends one more evaluation
(NFE = N instead of N - 1) on a corrector whose model output is never reused. That is the default
(``warmup_final_corrector=True``, golden cases ``solvers-*-unipc-n3-*``); ``False`` skips it as the
later steps do (NFE = N - 1; BENCHMARKS.md "UniPC's final corrector" shows what it changes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import (Callback, Counter, SolveResult, StepInfo, afs_direction, check_int_option, check_thresholding, dynamic_threshold,
                      finish, multistep_order, prepare, times_shape)
from .multistep import combine

__all__ = ["unipc", "unipc_coefficients", "unipc_step_weights", "VARIANTS"]

VARIANTS = ("bh1", "bh2")


def unipc_coefficients(t_hist: list[float], t: float, order: int, *, predict_x0: bool, variant: str,
                       corrector: bool) -> tuple[float, list[float], list[float] | None]:
    """Float64 coefficients of one UniPC step (times newest last; ``len(t_hist) >= order``).

    Returns ``(a, pred, corr)``: the predicted state is ``a x + sum_j pred[j] m_j`` over the
    history (j = 0 newest); the corrected one is ``a x + sum_j corr[j] m_j + corr[-1] m_t``
    with m_t the model output at the predicted state (``corr`` is None without the corrector).
    """
    s0 = t_hist[-1]
    h = math.log(s0) - math.log(t)
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(math.log(s0) - math.log(t_hist[-1 - k])) / h for k in range(1, order)] + [1.0]
    # b_i = i! phi_{i+1}(hh) / B(h), phi via the recursion phi_{k+1} = (phi_k - 1/k!) / hh.
    b = []
    h_phi_k = h_phi_1 / hh - 1.0
    fact = 1
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)], dtype=np.float64)
    a = t / s0 if predict_x0 else 1.0
    f = -1.0 if predict_x0 else -t
    base = [f * h_phi_1] + [0.0] * (order - 1)            # a x - phi_1 m_0 (times t for noise prediction)

    def with_d1(rhos) -> list[float]:
        """base + f B(h) sum_k rho_k (m_k - m_0) / r_k as coefficients on (m_0, m_1, ...)."""
        c = list(base)
        for k in range(1, order):
            w = f * B_h * rhos[k - 1] / rks[k - 1]
            c[k] += w
            c[0] -= w
        return c

    if order == 1:
        pred = list(base)
    else:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], np.array(b[:-1])).tolist()
        pred = with_d1(rhos_p)
    corr = None
    if corrector:
        rhos_c = [0.5] if order == 1 else np.linalg.solve(R, np.array(b)).tolist()
        corr = with_d1(rhos_c)
        w_t = f * B_h * rhos_c[-1]                          # rho_c[-1] (m_t - m_0)
        corr[0] -= w_t
        corr.append(w_t)
    return a, pred, corr


def unipc_step_weights(t_hist, t, order: int, *, predict_x0: bool, variant: str, corrector: bool):
    """:func:`unipc_coefficients` with per-sample times (floats, 0-d or ``(B,)`` tensors; what the AMED-Plugin on
    UniPC needs): the same ``(a, pred, corr)`` as tensors broadcast over the times, differentiable; the linear
    systems are solved per sample (``torch.linalg.solve``)."""
    ts = [torch.as_tensor(v, dtype=torch.float64) for v in list(t_hist) + [t]]
    shape, device = times_shape(ts)
    ts = [v.to(device).reshape(-1) for v in ts]
    *hist, tt = ts
    s0 = hist[-1]
    h = torch.log(s0) - torch.log(tt)
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)
    B_h = hh if variant == "bh1" else torch.expm1(hh)
    rks = [(torch.log(s0) - torch.log(hist[-1 - k])) / h for k in range(1, order)] + [torch.ones_like(h)]
    b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    n = max(int(v.numel()) for v in ts)
    R = torch.stack([torch.stack([rk.expand(n) ** (i - 1) for rk in rks], dim=-1) for i in range(1, order + 1)], dim=-2)
    bv = torch.stack([v.expand(n) for v in b], dim=-1)
    a = tt / s0 if predict_x0 else torch.ones_like(h)
    f = -torch.ones_like(h) if predict_x0 else -tt
    base = [f * h_phi_1] + [torch.zeros_like(h)] * (order - 1)

    def with_d1(rhos) -> list:
        c = list(base)
        for k in range(1, order):
            w = f * B_h * rhos[k - 1] / rks[k - 1]
            c[k] = c[k] + w
            c[0] = c[0] - w
        return c

    if order == 1:
        pred = list(base)
    elif order == 2:
        pred = with_d1([0.5 * torch.ones_like(h)])
    else:
        sol = torch.linalg.solve(R[..., :-1, :-1], bv[..., :-1])
        pred = with_d1([sol[..., k] for k in range(order - 1)])
    corr = None
    if corrector:
        rhos_c = [0.5 * torch.ones_like(h)] if order == 1 else list(torch.linalg.solve(R, bv).unbind(-1))
        corr = with_d1(rhos_c)
        w_t = f * B_h * rhos_c[-1]
        corr[0] = corr[0] - w_t
        corr.append(w_t)
    def out(v):
        return v.expand(n).reshape(shape)

    return out(a), [out(c) for c in pred], None if corr is None else [out(c) for c in corr]


def unipc(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
          callback: Callback | None = None, max_order: int = 3, predict_x0: bool = True, lower_order_final: bool = True,
          dynamic_thresholding: bool | None = None, variant: str = "bh2",
          warmup_final_corrector: bool = True) -> SolveResult:
    """UniPC-k (Zhao et al. 2023, arXiv 2302.04867), k <= 3, variants bh1 / bh2, one NFE per step.

    ``warmup_final_corrector``: on grids with ``N <= max_order`` points, correct the final step as the
    reference does (one more NFE; see the module docstring), or skip it (False).
    """
    check_int_option("max_order", max_order, 1, 3)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    threshold = check_thresholding(dynamic_thresholding, predict_x0)
    t_steps = prepare(x, sigmas)
    ts = t_steps.tolist()
    N = len(ts)
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None

    def model_output(x_t, i, denoised):
        if predict_x0:
            return dynamic_threshold(denoised) if threshold else denoised
        return (x_t - denoised) / ts[i]

    # The first model output, at sigmas[0] (AFS: D = x - t x / sqrt(1 + t^2), no NFE).
    if afs:
        denoised = x - ts[0] * afs_direction(x, t_steps[0])
    else:
        denoised = D(x, t_steps[0])
    model_hist = [model_output(x, 0, denoised)]
    t_hist = [ts[0]]
    x_next = x
    for i in range(N - 1):
        x_cur, t_next = x_next, ts[i + 1]
        warmup = i + 1 < max_order
        order = multistep_order(i, N, max_order, lower_order_final)
        use_corrector = i < N - 2 or (warmup and warmup_final_corrector)
        a, pred, corr = unipc_coefficients(t_hist[-order:], t_next, order, predict_x0=predict_x0, variant=variant,
                                           corrector=use_corrector)
        x_pred = combine(x_cur, a, [(c, model_hist[-1 - j]) for j, c in enumerate(pred)])
        denoised = None
        if use_corrector:
            denoised = D(x_pred, t_steps[i + 1])
            m_t = model_output(x_pred, i + 1, denoised)
            x_next = combine(x_cur, a, [(c, model_hist[-1 - j]) for j, c in enumerate(corr[:-1])] + [(corr[-1], m_t)])
            model_hist.append(m_t)
            t_hist.append(t_next)
            if len(model_hist) > max_order:
                model_hist.pop(0)
                t_hist.pop(0)
        else:
            x_next = x_pred
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, ts[i], t_next, x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)
