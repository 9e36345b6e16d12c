"""Multistep solvers: iPNDM, variable-step iPNDM, multistep DPM-Solver++ — plus the pure update
helpers the AMED-Plugins reuse (:func:`dpmpp_update`, :func:`ipndm_combination`).

All in EDM's sigma form: the ODE is dx/dsigma = eps(x; sigma) = (x - D(x; sigma)) / sigma.
Step coefficients are computed once per step in float64 (Python floats, from the grid), so a
step costs only the tensor combination; the helpers also accept per-sample tensor times
(scalar, ``(B,)`` or ``(B,1,..)``), which is what AMED's learned intermediate times need.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._common import (Callback, Counter, SolveResult, StepInfo, afs_direction, check_int_option, check_thresholding, direction,
                      dynamic_threshold, finish, multistep_order, prepare, push)

__all__ = ["ipndm", "ipndm_v", "dpmpp", "dpmpp_update", "dpmpp_coefficients", "ipndm_combination",
           "ipndm_v_coefficients", "combine", "IPNDM_COEFFS"]

# Adams-Bashforth weights for a constant step (iPNDM, Zhang & Chen 2023): newest direction first.
IPNDM_COEFFS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


# ---------------------------------------------------------------------------------------------
# Small scalar helpers: every step coefficient is either a Python float or a broadcastable tensor.

def _col(v, x: torch.Tensor):
    """A time/scale as something that broadcasts against x: floats stay floats, (B,) -> (B,1,..,1)."""
    if torch.is_tensor(v):
        v = v.to(dtype=x.dtype, device=x.device)
        if v.ndim >= 1 and v.numel() > 1:
            return v.reshape(-1, *([1] * (x.ndim - 1)))
        return v.reshape(())
    return float(v)


def _log(v):
    return torch.log(v) if torch.is_tensor(v) else math.log(v)


def _expm1(v):
    return torch.expm1(v) if torch.is_tensor(v) else math.expm1(v)


def combine(x: torch.Tensor | None, a, terms: Sequence[tuple[object, torch.Tensor]]) -> torch.Tensor:
    """``a * x + sum_j c_j * m_j`` with as few kernels as possible (float coefficients fuse into add)."""
    out = None
    if x is not None:
        out = x if (isinstance(a, float) and a == 1.0) else x * a
    for c, m in terms:
        if out is None:
            out = m * c
        elif isinstance(c, float):
            out = torch.add(out, m, alpha=c)
        else:
            out = out + c * m
    return out


# ---------------------------------------------------------------------------------------------
# iPNDM (Adams-Bashforth with constant-step weights).

def ipndm_combination(d_cur: torch.Tensor, history: Sequence[torch.Tensor], order: int) -> torch.Tensor:
    """iPNDM's direction: the order-k Adams-Bashforth combination of d_cur and the k-1 newest
    previous directions (``history`` newest last), e.g. k=2: (3 d_n - d_{n-1}) / 2.

    The step is then ``x_next = x_cur + (t_next - t_cur) * direction`` (Zhang & Chen 2023, iPNDM).
    """
    if order not in IPNDM_COEFFS:
        raise ValueError(f"order must be in 1..4, got {order!r}")
    if len(history) < order - 1:
        raise ValueError(f"order {order} needs {order - 1} previous directions, history has {len(history)}")
    w = IPNDM_COEFFS[order]
    return combine(None, 1.0, [(w[0], d_cur)] + [(w[j], history[-j]) for j in range(1, order)])


def ipndm(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
          callback: Callback | None = None, max_order: int = 4) -> SolveResult:
    """Improved PNDM (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator"):
    x_{n+1} = x_n + (t_{n+1} - t_n) * sum_j w^k_j d_{n-j}, k = min(max_order, n + 1) (order 1 = Euler)."""
    check_int_option("max_order", max_order, 1, 4)
    t_steps = prepare(x, sigmas)
    ts = t_steps.tolist()
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    history: list[torch.Tensor] = []           # previous directions d, newest last (at most max_order - 1)
    x_next = x
    for i in range(len(ts) - 1):
        x_cur, t_cur, t_next = x_next, ts[i], ts[i + 1]
        d_cur, denoised = direction(D, x_cur, t_steps[i], t_cur, afs and i == 0)
        order = min(max_order, i + 1)
        w = IPNDM_COEFFS[order]
        h = t_next - t_cur
        x_next = combine(x_cur, 1.0, [(h * w[0], d_cur)] + [(h * w[j], history[-j]) for j in range(1, order)])
        push(history, d_cur, max_order - 1)
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, t_cur, t_next, x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)


# ---------------------------------------------------------------------------------------------
# Variable-step iPNDM.

def ipndm_v_coefficients(t_hist: Sequence[float], t_next: float, order: int) -> list[float]:
    """Variable-step Adams-Bashforth weights (newest first) for ``x_next = x_cur + h_n * sum_j c_j d_{n-j}``.

    ``t_hist`` are the times of the current and previous directions, newest last (at least ``order``
    of them). With h_n = t_next - t_cur, h_{n-1} = t_cur - t_prev, ... (the forms of the
    diff-solvers reference, which reduce to iPNDM's constant weights on a uniform grid).
    """
    if order == 1:
        return [1.0]
    t_cur = t_hist[-1]
    hn = t_next - t_cur
    hn1 = t_cur - t_hist[-2]
    if order == 2:
        return [(2 + hn / hn1) / 2, -(hn / hn1) / 2]
    hn2 = t_hist[-2] - t_hist[-3]
    temp1 = (1 - hn / (3 * (hn + hn1)) * (hn * (hn + hn1)) / (hn1 * (hn1 + hn2))) / 2
    if order == 3:
        return [(2 + hn / hn1) / 2 + temp1,
                -(hn / hn1) / 2 - (1 + hn1 / hn2) * temp1,
                temp1 * hn1 / hn2]
    if order == 4:
        hn3 = t_hist[-3] - t_hist[-4]
        temp2 = ((1 - hn / (3 * (hn + hn1))) / 2 + (1 - hn / (2 * (hn + hn1))) * hn / (6 * (hn + hn1 + hn2))) \
            * (hn * (hn + hn1) * (hn + hn1 + hn2)) / (hn1 * (hn1 + hn2) * (hn1 + hn2 + hn3))
        q = hn1 * (hn1 + hn2) / (hn2 * (hn2 + hn3))
        return [(2 + hn / hn1) / 2 + temp1 + temp2,
                -(hn / hn1) / 2 - (1 + hn1 / hn2) * temp1 - (1 + hn1 / hn2 + q) * temp2,
                temp1 * hn1 / hn2 + (hn1 / hn2 + q * (1 + hn2 / hn3)) * temp2,
                -temp2 * q * hn1 / hn2]
    raise ValueError(f"order must be in 1..4, got {order!r}")


def ipndm_v(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
            callback: Callback | None = None, max_order: int = 4) -> SolveResult:
    """Variable-step iPNDM: Adams-Bashforth with weights for the grid's actual step sizes
    (the form used by the AMED paper's baselines, Zhou et al. 2024, arXiv 2312.00094)."""
    check_int_option("max_order", max_order, 2, 4)
    t_steps = prepare(x, sigmas)
    ts = t_steps.tolist()
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    history: list[torch.Tensor] = []
    x_next = x
    for i in range(len(ts) - 1):
        x_cur, t_cur, t_next = x_next, ts[i], ts[i + 1]
        d_cur, denoised = direction(D, x_cur, t_steps[i], t_cur, afs and i == 0)
        order = min(max_order, i + 1)
        c = ipndm_v_coefficients(ts[i + 1 - order:i + 1], t_next, order)
        h = t_next - t_cur
        x_next = combine(x_cur, 1.0, [(h * c[0], d_cur)] + [(h * c[j], history[-j]) for j in range(1, order)])
        push(history, d_cur, max_order - 1)
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, t_cur, t_next, x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)


# ---------------------------------------------------------------------------------------------
# Multistep DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095), VE/sigma form with lambda = -log sigma.

def dpmpp_coefficients(t_prev_list: Sequence, t, order: int, *, predict_x0: bool):
    """Coefficients ``(a, [c_0, .., c_{k-1}])`` of the order-k multistep update
    ``x_t = a * x + sum_j c_j * m_{-1-j}`` (c_0 multiplies the newest model output).

    With h = lambda_t - lambda_0, r_0 = h_0 / h, r_1 = h_1 / h, D1_0 = (m_0 - m_1) / r_0, D1_1 = (m_1 - m_2) / r_1:
    data prediction: x_t = (t/s_0) x - phi_1 m_0 [- phi_1 D1_0 / 2 | + phi_2 D1 - phi_3 D2],  phi_1 = expm1(-h);
    noise prediction: x_t = x - t (phi_1 m_0 [+ phi_1 D1_0 / 2 | + phi_2 D1 + phi_3 D2]),   phi_1 = expm1(h);
    phi_2 = phi_1 / h +- 1, phi_3 = phi_2 / h - 1/2, D1 = D1_0 + r_0/(r_0+r_1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r_0+r_1).
    Times may be floats or broadcastable tensors (then so are the coefficients).

    Pitfall, kept on purpose: the order-3 form is the reference's (and the official DPM-Solver
    code's), whose D2 ~ h^2 m''/2 is half of what the phi_3 term needs, so its local error is
    O(h^3), not O(h^4) (tests/test_solvers.py measures it); the golden cases pin this form.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if len(t_prev_list) < order:
        raise ValueError(f"order {order} needs {order} previous times, got {len(t_prev_list)}")
    s0 = t_prev_list[-1]
    lam_t, lam_0 = -_log(t), -_log(s0)
    h = lam_t - lam_0
    phi_1 = _expm1(-h) if predict_x0 else _expm1(h)
    a = t / s0 if predict_x0 else 1.0
    f = -1.0 if predict_x0 else -t             # common factor of the model terms
    if order == 1:
        return a, [f * phi_1]
    lam_1 = -_log(t_prev_list[-2])
    r0 = (lam_0 - lam_1) / h
    if order == 2:
        # -phi_1 (m0 + (m0 - m1) / (2 r0))
        return a, [f * phi_1 * (1 + 0.5 / r0), -f * phi_1 * (0.5 / r0)]
    lam_2 = -_log(t_prev_list[-3])
    r1 = (lam_1 - lam_2) / h
    phi_2 = phi_1 / h + 1.0 if predict_x0 else phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    # D1_0 = u0 . m, D1_1 = u1 . m over (m0, m1, m2)
    u0 = (1 / r0, -1 / r0, 0.0)
    u1 = (0.0, 1 / r1, -1 / r1)
    k = r0 / (r0 + r1)
    D1 = [u0[j] + k * (u0[j] - u1[j]) for j in range(3)]
    D2 = [(u0[j] - u1[j]) / (r0 + r1) for j in range(3)]
    e0 = (1.0, 0.0, 0.0)
    s2, s3 = (-1.0, 1.0) if predict_x0 else (1.0, 1.0)   # data: -phi1 m0 + phi2 D1 - phi3 D2 = f (phi1 m0 - phi2 D1 + phi3 D2)
    return a, [f * (phi_1 * e0[j] + s2 * phi_2 * D1[j] + s3 * phi_3 * D2[j]) for j in range(3)]


def dpmpp_update(x: torch.Tensor, model_prev_list: Sequence[torch.Tensor], t_prev_list: Sequence, t, order: int, *,
                 predict_x0: bool, scale=1.0) -> torch.Tensor:
    """One multistep DPM-Solver++ update from ``t_prev_list[-1]`` to ``t`` (lists newest last).

    ``model_prev_list`` holds data predictions x0 (``predict_x0=True``) or noise predictions eps
    (``predict_x0=False``). ``scale`` multiplies the update (the model terms), as AMED-Plugin's
    ``scale_dir`` does: ``x_t = a x + scale * sum_j c_j m_j`` (see :func:`dpmpp_coefficients`).
    Times and scale: floats, 0-d tensors or per-sample ``(B,)`` tensors.
    """
    tl = [_col(v, x) for v in t_prev_list[-order:]] if order <= len(t_prev_list) else list(t_prev_list)
    a, c = dpmpp_coefficients(tl, _col(t, x), order, predict_x0=predict_x0)
    scale = _col(scale, x)
    if not (isinstance(scale, float) and scale == 1.0):
        c = [scale * cj for cj in c]
    return combine(x, a, [(cj, model_prev_list[-1 - j]) for j, cj in enumerate(c)])


def dpmpp(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
          callback: Callback | None = None, max_order: int = 3, predict_x0: bool = True, lower_order_final: bool = True,
          dynamic_thresholding: bool | None = None) -> SolveResult:
    """Multistep DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095), orders 1-3, one NFE per step.

    ``predict_x0``: data prediction (DPM-Solver++) or noise prediction (multistep DPM-Solver).
    ``dynamic_thresholding`` (default: on with data prediction, as in the reference) clamps each
    data prediction with Imagen's rule before it enters the history. AFS replaces the first
    evaluation by D = x - t * x / sqrt(1 + t^2).
    """
    check_int_option("max_order", max_order, 1, 3)
    threshold = check_thresholding(dynamic_thresholding, predict_x0)
    t_steps = prepare(x, sigmas)
    ts = t_steps.tolist()
    N = len(ts)
    D = Counter(denoiser, class_labels)
    states = [x] if return_trajectory else None
    model_hist: list[torch.Tensor] = []
    t_hist: list[float] = []
    x_next = x
    for i in range(N - 1):
        x_cur, t_cur, t_next = x_next, ts[i], ts[i + 1]
        if afs and i == 0:
            d_cur = afs_direction(x_cur, t_steps[i])
            denoised = x_cur - t_cur * d_cur
        else:
            denoised = D(x_cur, t_steps[i])
        if predict_x0:
            model_hist.append(dynamic_threshold(denoised) if threshold else denoised)
        else:
            model_hist.append(d_cur if (afs and i == 0) else (x_cur - denoised) / t_cur)
        t_hist.append(t_cur)
        if len(model_hist) > 3:
            model_hist.pop(0)
            t_hist.pop(0)
        order = multistep_order(i, N, max_order, lower_order_final)
        a, c = dpmpp_coefficients(t_hist[-order:], t_next, order, predict_x0=predict_x0)
        x_next = combine(x_cur, a, [(cj, model_hist[-1 - j]) for j, cj in enumerate(c)])
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, t_cur, t_next, x_next, denoised, D.nfe))
    return finish(x_next, states, D, denoise_to_zero, t_steps[-1], return_trajectory)
