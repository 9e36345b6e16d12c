"""EPD-Solver and EPD-Plugin (Zhu et al., ICCV 2025, "Distilling Parallel Gradients for Fast ODE Solvers
of Diffusion Models"; reference: BeierZhu/EPD, branch ``EPD-Solver``, not EPD-Solver++).

Notation (the paper's, EDM's sigma form, ODE dx/dt = (x - D(x; t)) / t). On the interval
[t_n, t_{n+1}] (loop index n = 0..N-2, h = t_{n+1} - t_n) EPD evaluates K intermediate points in
parallel and combines their gradients with learned simplex weights:

    d_n   = (x_n - D(x_n; t_n)) / t_n             (or x_n / sqrt(1 + t_n^2) with AFS on step 0)
    tau_k = t_{n+1}^{r_k} t_n^{1 - r_k}            k = 1..K                       ("t_mid")
    x_k   = x_n + (tau_k - t_n) d_n                (EPD-Plugin on iPNDM: x_n + (tau_k - t_n) AB_o(d_n, d_{n-1}, ...))
    d_k   = (x_k - D(x_k; o_k tau_k)) / tau_k      o_k = scale_time
    x_{n+1} = x_n + sum_k lambda_k delta_k h d_k   lambda_k = weight (softmax), delta_k = scale_dir

Parameters (:class:`EPDParams`, the reference's ``EPD_predictor``): four raw tables of shape
(N-1, K), the step index selecting the row (EPD's parameters do not depend on the sample):
r = sigmoid(r_raw); lambda = softmax(w_raw) over K; delta = 2 sigmoid(p/2) b_d + 1 - b_d when
b_d = ``scale_dir`` > 0, else 1; o likewise with b_t = ``scale_time``; with ``fcn`` the last step's
delta is forced to 1. :class:`FixedEPDParams` holds already-mapped per-step values (golden cases,
ablations, a trained table frozen for inference). The samplers take either as ``policy=`` (the slot the
method table reserves for learned parameters; an EPD policy maps a step index to :class:`EPDCoefficients`).

Where we follow the reference's quirks (kept on purpose, the golden cases depend on them):
- d_k is divided by tau_k, **not** by the evaluation time o_k tau_k (the denoiser sees o_k tau_k).
- The final combination uses only the K intermediate gradients; d_n itself only places the x_k
  (the weights lambda sum to 1 over the intermediate points, none is left for d_n).
- EPD-Plugin: the Adams-Bashforth weights are iPNDM's fixed-step ones (1; 3/2, -1/2; 23/12, -16/12,
  5/12; 55/24, -59/24, 37/24, -9/24) applied to the partial step tau_k - t_n; order
  o = min(max_order, len(history) + 1); the history holds the earlier steps' d_n (the AFS slope
  included), at most max_order - 1, detached. The multistep combination only places the x_k.
- NFE. The paper (and the reference's sample.py / train.py) counts one NFE at t_n plus one
  *parallel round* for the K points: ``epd_nfe(N, afs) = 2 (N - 1) - afs``, independent of K. The
  per-sample work is ``epd_total_evals(N, K, afs) = (N - 1)(K + 1) - afs`` evaluations, which is
  what a single GPU pays in wall clock (the batched round is K times the batch). Here
  ``SolveResult.nfe`` is that per-sample count (the project's rule: nfe = evaluations made);
  :class:`EPDResult` also carries ``paper_nfe`` and ``net_calls`` (forward calls actually made).

Where we depart:
- Both samplers evaluate the K points in one batched call by default (``batched=True``): samples
  are repeated K times along the batch, b-major (row b*K + k), class labels repeated to match, one
  call per step. The reference's EPD-Plugin makes K calls in a Python loop; ``batched=False``
  reproduces that (and, for ``epd``, the reference's sequential ``epd_sampler``, used in training).
  The two forms add the K terms in a different order (differences ~1e-12 in float64).
- ``denoise_to_zero`` counts its extra evaluation in every count (the reference's printed NFE ignores it).
- Tables are float64 by default (the reference's ``nn.Parameter(torch.randn(...))`` is float32); the
  step arithmetic runs in ``x.dtype``.
- The callback's ``denoised`` is D(x_n; t_n) (None on the AFS step).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..schedules import check_grid
from ..solvers import SolveResult, StepInfo, ipndm_combination

__all__ = ["EPDCoefficients", "EPDParams", "FixedEPDParams", "EPDResult", "EPDStepOut", "EPDEvaluator", "epd",
           "epd_ipndm", "epd_step", "epd_nfe", "epd_total_evals", "epd_net_calls", "intermediate_times",
           "map_scale", "EPD_SOLVERS", "BASE_SOLVER"]


# ---------------------------------------------------------------------------------------------
# NFE accounting

def _check_counts(num_steps: int, K: int = 1) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"K (num_points) must be a positive integer, got {K!r}")


def epd_nfe(num_steps: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
    """The paper's NFE: one evaluation at t_n plus one parallel round of K per step, ``2 (N - 1) - afs``.

    This is what the paper and the reference's sample.py / train.py report (doubled there for CFG);
    it does not depend on K, so it is a latency count on hardware that runs the K points at the cost
    of one. ``denoise_to_zero`` adds one (the reference does not count it).
    """
    _check_counts(num_steps)
    return 2 * (num_steps - 1) - int(bool(afs)) + int(bool(denoise_to_zero))


def epd_total_evals(num_steps: int, K: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
    """Per-sample denoiser evaluations, ``(N - 1)(K + 1) - afs`` (+1 with denoise_to_zero): the compute a
    single GPU pays, and ``SolveResult.nfe`` of :func:`epd` / :func:`epd_ipndm`. Equals :func:`epd_nfe` for K = 1."""
    _check_counts(num_steps, K)
    return (num_steps - 1) * (K + 1) - int(bool(afs)) + int(bool(denoise_to_zero))


def epd_net_calls(num_steps: int, K: int, afs: bool = False, denoise_to_zero: bool = False, batched: bool = True) -> int:
    """Forward calls of the network: :func:`epd_nfe` when the K points go in one batched call, else
    :func:`epd_total_evals` (the reference's EPD-Plugin and sequential ``epd_sampler``)."""
    if batched:
        _check_counts(num_steps, K)
        return epd_nfe(num_steps, afs, denoise_to_zero)
    return epd_total_evals(num_steps, K, afs, denoise_to_zero)


# ---------------------------------------------------------------------------------------------
# Parameters

@dataclass
class EPDCoefficients:
    """One step's values, each (K,): r in (0, 1), weight (lambda, on the simplex), scale_dir (delta),
    scale_time (o)."""

    r: torch.Tensor
    weight: torch.Tensor
    scale_dir: torch.Tensor
    scale_time: torch.Tensor

    def to(self, like: torch.Tensor) -> "EPDCoefficients":
        kw = dict(dtype=like.dtype, device=like.device)
        return EPDCoefficients(self.r.to(**kw), self.weight.to(**kw), self.scale_dir.to(**kw), self.scale_time.to(**kw))


def map_scale(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """The reference's scale head: ``2 sigmoid(raw / 2) b + 1 - b`` in (1 - b, 1 + b) when b > 0, else 1."""
    if bound:
        return 2 * torch.sigmoid(0.5 * raw) * bound + (1 - bound)
    return torch.ones_like(raw)


def intermediate_times(t_cur, t_next, r):
    """tau = t_next^r * t_cur^(1 - r) (geometric interpolation; the reference's ``t_mid``)."""
    return (t_next ** r) * (t_cur ** (1 - r))


class EPDParams(torch.nn.Module):
    """The four learned tables of EPD (the reference's ``EPD_predictor``), each (num_steps - 1, num_points).

    ``params(step) -> EPDCoefficients`` maps row ``step``:
    r = sigmoid(r_params), weight = softmax(weight_s) over K, scale_dir = :func:`map_scale` (scale_dir_params,
    b_d), scale_time = :func:`map_scale` (scale_time_params, b_t); with ``fcn`` the last step's scale_dir is 1.
    A disabled head (bound 0) keeps its table (unused, no gradient), as the reference does.

    Initialisation as the reference: standard normal draws (``generator`` for reproducibility), here in
    ``dtype`` (float64 by default; the reference uses float32). Table order of the draws:
    r_params, scale_dir_params, scale_time_params, weight_s (the reference's creation order).
    """

    TABLES = ("r_params", "weight_s", "scale_dir_params", "scale_time_params")

    def __init__(self, num_steps: int, num_points: int = 2, *, scale_dir: float = 0.0, scale_time: float = 0.0,
                 fcn: bool = False, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64):
        super().__init__()
        _check_counts(num_steps, num_points)
        for name, v in (("scale_dir", scale_dir), ("scale_time", scale_time)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} (the range half-width b) must be a finite number >= 0, got {v!r}")
        if not isinstance(fcn, bool):
            raise ValueError(f"fcn must be true or false, got {fcn!r}")
        self.num_steps = num_steps
        self.num_points = num_points
        self.scale_dir = float(scale_dir)
        self.scale_time = float(scale_time)
        self.fcn = fcn
        shape = (num_steps - 1, num_points)

        def draw():
            return torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))

        self.r_params = draw()
        self.scale_dir_params = draw()
        self.scale_time_params = draw()
        self.weight_s = draw()

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_raw(cls, r_params, weight_s, scale_dir_params, scale_time_params, *, scale_dir: float = 0.0,
                 scale_time: float = 0.0, fcn: bool = False, dtype: torch.dtype = torch.float64) -> "EPDParams":
        """Parameters with given raw tables (arrays or tensors, all (num_steps - 1, K))."""
        tabs = [torch.as_tensor(np.asarray(t, dtype=np.float64) if not torch.is_tensor(t) else t).to(dtype)
                for t in (r_params, weight_s, scale_dir_params, scale_time_params)]
        if tabs[0].ndim != 2 or any(t.shape != tabs[0].shape for t in tabs):
            raise ValueError(f"the four raw tables must share one (num_steps - 1, K) shape, got {[tuple(t.shape) for t in tabs]}")
        n, K = tabs[0].shape
        p = cls(n + 1, K, scale_dir=scale_dir, scale_time=scale_time, fcn=fcn, dtype=dtype)
        with torch.no_grad():
            for name, t in zip(cls.TABLES, tabs):
                getattr(p, name).copy_(t)
        return p

    def config(self) -> dict:
        """JSON-able hyperparameters (everything but the tables)."""
        return {"num_steps": self.num_steps, "num_points": self.num_points, "scale_dir": self.scale_dir,
                "scale_time": self.scale_time, "fcn": self.fcn}

    # -- mapping ----------------------------------------------------------------------------------
    def forward(self, step: int) -> EPDCoefficients:
        if not isinstance(step, int) or not 0 <= step < self.num_steps - 1:
            raise ValueError(f"EPDParams has {self.num_steps - 1} steps but step {step!r} was asked for "
                             "(num_steps of the grid must match)")
        r = torch.sigmoid(self.r_params[step])
        w = torch.softmax(self.weight_s[step], dim=-1)
        sd = map_scale(self.scale_dir_params[step], self.scale_dir)
        st = map_scale(self.scale_time_params[step], self.scale_time)
        if self.fcn and step == self.num_steps - 2:
            sd = torch.ones_like(sd)
        return EPDCoefficients(r, w, sd, st)

    def tables(self) -> dict[str, torch.Tensor]:
        """The mapped values of every step, each (num_steps - 1, K), detached: r, weight, scale_dir, scale_time."""
        with torch.no_grad():
            rows = [self(i) for i in range(self.num_steps - 1)]
        return {k: torch.stack([getattr(c, k) for c in rows]) for k in ("r", "weight", "scale_dir", "scale_time")}

    def fixed(self) -> "FixedEPDParams":
        """A frozen copy of the mapped values (no autograd, no mapping at sampling time)."""
        t = self.tables()
        return FixedEPDParams(t["r"], t["weight"], t["scale_dir"], t["scale_time"])


class FixedEPDParams:
    """Already-mapped per-step values, each (num_steps - 1, K); ``params(step) -> EPDCoefficients`` (float64).

    scale_dir / scale_time None = 1. Weights are used as given (the learned form is a softmax; nothing
    here forces them to sum to 1).
    """

    def __init__(self, r, weight, scale_dir=None, scale_time=None):
        def arr(v):
            v = v.detach().cpu().numpy() if torch.is_tensor(v) else v
            return np.array(v, dtype=np.float64, ndmin=2)

        self.r = arr(r)
        n, K = self.r.shape
        self.weight = arr(weight)
        self.scale_dir = np.ones((n, K)) if scale_dir is None else arr(scale_dir)
        self.scale_time = np.ones((n, K)) if scale_time is None else arr(scale_time)
        for name in ("weight", "scale_dir", "scale_time"):
            if getattr(self, name).shape != (n, K):
                raise ValueError(f"FixedEPDParams: {name} has shape {getattr(self, name).shape}, r has {(n, K)}")
        if not np.all((self.r > 0) & (self.r <= 1)):
            raise ValueError("FixedEPDParams: r must lie in (0, 1]")
        if not np.all(self.scale_time > 0):
            raise ValueError("FixedEPDParams: scale_time must be positive")
        self.num_steps = n + 1
        self.num_points = K

    def __call__(self, step: int) -> EPDCoefficients:
        if not isinstance(step, int) or not 0 <= step < self.num_steps - 1:
            raise ValueError(f"FixedEPDParams has {self.num_steps - 1} steps but step {step!r} was asked for "
                             "(num_steps of the grid must match)")
        return EPDCoefficients(*(torch.from_numpy(getattr(self, k)[step].copy())
                                 for k in ("r", "weight", "scale_dir", "scale_time")))


# ---------------------------------------------------------------------------------------------
# The step

class EPDEvaluator:
    """Counts a denoiser's use: ``nfe_total`` (per-sample evaluations), ``paper_nfe`` (evaluation rounds:
    one at t_n, one per step for the K points however they are batched) and ``net_calls`` (forward calls)."""

    def __init__(self, denoiser, class_labels=None):
        self.denoiser = denoiser
        self.class_labels = class_labels
        self.nfe_total = 0
        self.paper_nfe = 0
        self.net_calls = 0

    def single(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; sigma): one round, one call, one evaluation per sample."""
        self.nfe_total += 1
        self.paper_nfe += 1
        self.net_calls += 1
        return self.denoiser(x, sigma, self.class_labels)

    def points(self, x_flat: torch.Tensor, sigma_flat: torch.Tensor, K: int) -> torch.Tensor:
        """One batched call on (B*K, ...) inputs, b-major; labels repeated K times per sample."""
        labels = self.class_labels
        if labels is not None and K > 1:
            labels = torch.repeat_interleave(labels, K, dim=0)
        self.nfe_total += K
        self.paper_nfe += 1
        self.net_calls += 1
        return self.denoiser(x_flat, sigma_flat, labels)

    def point(self, x: torch.Tensor, sigma, first: bool) -> torch.Tensor:
        """One of the K points on its own (the sequential form): counts one round per step (first=True)."""
        self.nfe_total += 1
        self.paper_nfe += int(first)
        self.net_calls += 1
        return self.denoiser(x, sigma, self.class_labels)


@dataclass
class EPDStepOut:
    x: torch.Tensor                    # the state at t_{n+1}
    d_cur: torch.Tensor                # d_n (AFS slope on an AFS step)
    denoised: Optional[torch.Tensor]   # D(x_n; t_n), None on an AFS step
    history: tuple                     # the plugin's history after this step (newest last); () for epd
    t_mid: torch.Tensor                # (K,) the intermediate times tau_k
    coefficients: EPDCoefficients


def _col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(K,) -> (1, K, 1, ..., 1) against (B, K, ...) tensors of ndim + 1 dimensions."""
    return v.reshape(1, -1, *([1] * (ndim - 1)))


def epd_step(D: EPDEvaluator, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, coeffs: EPDCoefficients, *,
             afs_step: bool = False, history: Sequence[torch.Tensor] | None = None, max_order: int | None = None,
             batched: bool = True) -> EPDStepOut:
    """One EPD step t_cur -> t_next (0-dim tensors in x's dtype) with this step's coefficients.

    ``history`` / ``max_order`` None: EPD-Solver (x_k placed by Euler from d_n). Given: EPD-Plugin on
    iPNDM (x_k placed by the Adams-Bashforth combination of order min(max_order, len(history) + 1));
    the returned history has d_n appended (detached), keeping the newest max_order - 1.
    Differentiable in x and in the coefficients (training); no ``no_grad`` inside.
    """
    c = coeffs.to(x)
    K = int(c.r.shape[0])
    if afs_step:
        denoised = None
        d_cur = x / torch.sqrt(1 + t_cur * t_cur)
    else:
        denoised = D.single(x, t_cur)
        d_cur = (x - denoised) / t_cur
    plugin = max_order is not None
    if plugin:
        hist = list(history or ())
        order = min(max_order, len(hist) + 1)
        direction = ipndm_combination(d_cur, hist, order) if order > 1 else d_cur
    else:
        direction = d_cur
    t_mid = intermediate_times(t_cur, t_next, c.r)          # (K,)
    h = t_next - t_cur
    if batched:
        B = x.shape[0]
        x_mid = x.unsqueeze(1) + _col(t_mid - t_cur, x.ndim) * direction.unsqueeze(1)      # (B, K, ...)
        sigma = (c.scale_time * t_mid).repeat(B)                                            # row b*K + k
        den = D.points(x_mid.reshape(B * K, *x.shape[1:]), sigma, K).reshape(x_mid.shape)
        d_mid = (x_mid - den) / _col(t_mid, x.ndim)           # divided by tau_k, not o_k tau_k (reference)
        x_next = x + (_col(c.weight * c.scale_dir, x.ndim) * h * d_mid).sum(dim=1)
    else:
        x_next = x
        for k in range(K):
            x_k = x + (t_mid[k] - t_cur) * direction
            den = D.point(x_k, c.scale_time[k] * t_mid[k], first=(k == 0))
            d_k = (x_k - den) / t_mid[k]
            x_next = x_next + c.weight[k] * c.scale_dir[k] * h * d_k
    new_hist: tuple = ()
    if plugin and max_order > 1:
        new_hist = tuple(list(history or ()) + [d_cur.detach()])[-(max_order - 1):]
    return EPDStepOut(x_next, d_cur, denoised, new_hist, t_mid, c)


# ---------------------------------------------------------------------------------------------
# The samplers

@dataclass
class EPDResult(SolveResult):
    """:class:`SolveResult` (``nfe`` = per-sample evaluations) plus the paper's NFE and the forward calls made."""

    paper_nfe: int = 0
    net_calls: int = 0


def _check_policy(policy, num_steps: int):
    if policy is None or not callable(policy):
        raise ValueError("EPD needs policy= (an EPDParams, a FixedEPDParams, or any callable step -> EPDCoefficients)")
    n = getattr(policy, "num_steps", None)
    if n is not None and n != num_steps:
        raise ValueError(f"the EPD parameters were made for num_steps={n} but the grid has {num_steps} points")


def _coefficients(policy, step: int) -> EPDCoefficients:
    hint = "(an AMED policy takes features and times; use EPDParams or FixedEPDParams)"
    try:
        c = policy(step)
    except TypeError as e:
        raise ValueError(f"an EPD policy is called as policy(step) -> EPDCoefficients; this one raised {e} {hint}") from e
    if not isinstance(c, EPDCoefficients):
        raise ValueError(f"an EPD policy maps a step index to EPDCoefficients, got {type(c).__name__} {hint}")
    return c


def _prepare(x: torch.Tensor, sigmas) -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError("x must be a batched tensor (B, ...) holding the state at sigmas[0]")
    return check_grid(torch.as_tensor(sigmas, dtype=torch.float64)).to(dtype=x.dtype, device=x.device)


def _run(denoiser, x, sigmas, *, policy, class_labels, afs, denoise_to_zero, return_trajectory, callback, batched,
         max_order) -> EPDResult:
    t_steps = _prepare(x, sigmas)
    N = int(t_steps.shape[0])
    _check_policy(policy, N)
    if not isinstance(batched, bool):
        raise ValueError(f"batched must be true or false, got {batched!r}")
    D = EPDEvaluator(denoiser, class_labels)
    states = [x] if return_trajectory else None
    history: tuple = ()
    x_next = x
    for i in range(N - 1):
        out = epd_step(D, x_next, t_steps[i], t_steps[i + 1], _coefficients(policy, i), afs_step=bool(afs) and i == 0,
                       history=history, max_order=max_order, batched=batched)
        x_next, history = out.x, out.history
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, float(t_steps[i]), float(t_steps[i + 1]), x_next, out.denoised, D.nfe_total))
    if denoise_to_zero:
        x_next = D.single(x_next, t_steps[-1])
        if states is not None:
            states.append(x_next)
    traj = torch.stack(states) if states is not None else None
    return EPDResult(x=x_next, nfe=D.nfe_total, trajectory=traj, paper_nfe=D.paper_nfe, net_calls=D.net_calls)


def epd(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
        callback: Callable[[StepInfo], None] | None = None, batched: bool = True) -> EPDResult:
    """EPD-Solver: K parallel intermediate gradients per step (the reference's ``epd_parallel_sampler``).

    ``batched=True`` (default): the K points of a step go to the denoiser in one call (batch B*K), so
    ``net_calls == paper_nfe == 2 (N - 1) - afs``. ``batched=False``: K calls in a loop, the
    reference's sequential ``epd_sampler`` (the form its training uses); same values up to ~1e-12.
    ``nfe`` = per-sample evaluations ``(N - 1)(K + 1) - afs`` (see :func:`epd_total_evals`).
    """
    return _run(denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs, denoise_to_zero=denoise_to_zero,
                return_trajectory=return_trajectory, callback=callback, batched=batched, max_order=None)


def epd_ipndm(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False,
              return_trajectory=False, callback: Callable[[StepInfo], None] | None = None, max_order: int = 4,
              batched: bool = True) -> EPDResult:
    """EPD-Plugin on iPNDM (the reference's ``ipndm_sampler`` with a predictor), max_order in 1..4.

    The K points are placed by Adams-Bashforth partial steps from d_n and the history of earlier d's; the
    state moves by the same weighted sum of intermediate gradients as EPD-Solver. The reference makes
    the K calls one after another (``batched=False``, net_calls = nfe); ``batched=True`` (default)
    makes one call per step with identical values up to summation order (~1e-12).
    """
    if not isinstance(max_order, int) or isinstance(max_order, bool) or not 1 <= max_order <= 4:
        raise ValueError(f"max_order must be an integer in [1, 4], got {max_order!r}")
    return _run(denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs, denoise_to_zero=denoise_to_zero,
                return_trajectory=return_trajectory, callback=callback, batched=batched, max_order=max_order)


EPD_SOLVERS: dict[str, Callable[..., EPDResult]] = {"epd": epd, "epd+ipndm": epd_ipndm}
# Base solver of each variant (the same-NFE baseline; the reference's plugin teacher family).
BASE_SOLVER = {"epd": "heun", "epd+ipndm": "ipndm"}


# ---------------------------------------------------------------------------------------------
# Training (one interval per optimiser step against the teacher's state at t_{n+1})

@dataclass(frozen=True)
class EPDTrainConfig:
    """How to fit :class:`EPDParams` (frozen; JSON round-trip with to_dict/from_dict).

    solver: "epd" or "epd+ipndm"; num_points (K), scale_dir (b_d), scale_time (b_t), fcn: the parameters'
      hyperparameters (the reference's defaults: K=2, b_d=0.01, b_t=0); afs, max_order: the student's options.
    lr, beta1, beta2, eps: Adam (the reference: 5e-3, 0.9, 0.999, 1e-8). seed: the tables' initialisation
      (standard normal, as the reference).
    restart: the student's input at step n: "own" (its own detached output and, for the plugin, its
      history; the reference continues from its own output) or "teacher" (the teacher's state x_n).
    batched: the K points in one call (True) or the sequential form (False; the reference's training).
    num_trajectories: stop after this many trajectories (None = when the batches run out).
    dtype: "float32" / "float64" / None (= the teacher batch's dtype).
    loss_weighting: "sum" (sum_b ||x_{n+1} - x^T_{n+1}||^2 / B) or "relative" (divided by the teacher's
      sum_b ||x^T_{n+1} - x^T_n||^2 / B), as in train_amed.
    """

    solver: str = "epd"
    num_points: int = 2
    scale_dir: float = 0.01
    scale_time: float = 0.0
    fcn: bool = False
    afs: bool = False
    max_order: int = 4
    lr: float = 5e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    restart: str = "own"
    batched: bool = True
    num_trajectories: Optional[int] = None
    dtype: Optional[str] = None
    loss_weighting: str = "sum"

    def __post_init__(self):
        if self.solver not in EPD_SOLVERS:
            raise ValueError(f"solver must be one of {sorted(EPD_SOLVERS)}, got {self.solver!r}")
        if self.restart not in ("own", "teacher"):
            raise ValueError(f"restart must be 'own' or 'teacher', got {self.restart!r}")
        if self.loss_weighting not in ("sum", "relative"):
            raise ValueError(f"loss_weighting must be 'sum' or 'relative', got {self.loss_weighting!r}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        if not isinstance(self.max_order, int) or isinstance(self.max_order, bool) or not 1 <= self.max_order <= 4:
            raise ValueError(f"max_order must be an integer in [1, 4], got {self.max_order!r}")
        if self.num_trajectories is not None and (not isinstance(self.num_trajectories, int) or self.num_trajectories < 1):
            raise ValueError(f"num_trajectories must be a positive integer or None, got {self.num_trajectories!r}")
        for name in ("lr", "eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EPDTrainConfig":
        from dataclasses import fields
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown EPDTrainConfig field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    def sampler_options(self) -> dict:
        """Keyword options of the sampler these parameters are for (besides policy=)."""
        opts = {"afs": self.afs, "batched": self.batched}
        if self.solver == "epd+ipndm":
            opts["max_order"] = self.max_order
        return opts


@dataclass
class EPDTrainProgress:
    """One optimiser step: batch index, student step, loss, and the step's coefficients (means over K)."""

    batch: int
    step: int
    loss: float
    r_mean: float
    weight_max: float
    scale_dir_mean: float
    scale_time_mean: float
    trajectories: int
    seconds: float


@dataclass
class EPDTrainResult:
    params: EPDParams
    config: EPDTrainConfig
    losses: list  # per batch: [loss at step 0, ..., step N-2]
    updates: int = 0
    trajectories: int = 0
    seconds: float = 0.0


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def train_epd(denoiser, sigmas, batches, cfg: EPDTrainConfig | None = None, *, params: EPDParams | None = None,
              callback: Callable[[EPDTrainProgress], None] | None = None) -> EPDTrainResult:
    """Fit EPD's tables to teacher trajectories (``batches``: an iterable of ``amed_core.teacher.TeacherBatch``
    whose ``states`` are at the N points of ``sigmas``), one interval per Adam step, as ``train_amed`` does:

        loss_n = sum_b || EPD-step(x_n) - x^T_{n+1}(b) ||^2 / B,   n = 0..N-2,  then one Adam step
        (non-finite gradient entries zeroed).

    Departures from the reference's training loop (BeierZhu/EPD ``training/loss.py``, ``training_loop.py``),
    for a project without Inception features on every teacher: the last step's loss there is replaced by
    ``alpha`` x an Inception-feature MSE (and for EPD with N < 6 on pixel datasets only that last loss is
    back-propagated); here every step uses the L2 loss. There the student's own output is fed on *without*
    detaching (retain_graph: later losses reach earlier rows of the tables through the chain); here the input
    is detached (``restart="own"``) or the teacher's state (``restart="teacher"``), so row n is fitted by loss n only.
    """
    import time

    cfg = cfg or EPDTrainConfig()
    t_grid = check_grid(torch.as_tensor(sigmas, dtype=torch.float64))
    N = int(t_grid.shape[0])
    if params is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        params = EPDParams(N, cfg.num_points, scale_dir=cfg.scale_dir, scale_time=cfg.scale_time, fcn=cfg.fcn,
                           generator=gen)
    elif params.num_steps != N:
        raise ValueError(f"params were made for num_steps={params.num_steps} but the grid has {N} points")
    params.train().requires_grad_(True)
    opt = torch.optim.Adam(params.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    max_order = cfg.max_order if cfg.solver == "epd+ipndm" else None
    result = EPDTrainResult(params=params, config=cfg, losses=[])
    t0 = time.perf_counter()
    for k, batch in enumerate(batches):
        if cfg.num_trajectories is not None and result.trajectories >= cfg.num_trajectories:
            break
        states = batch.states if cfg.dtype is None else batch.states.to(_DTYPES[cfg.dtype])
        if states.shape[0] != N:
            raise ValueError(f"teacher batch has states at {states.shape[0]} times but the grid has {N} points")
        B = states.shape[1]
        t_steps = t_grid.to(dtype=states.dtype, device=states.device)
        labels = batch.class_labels.to(states.dtype) if batch.class_labels is not None else None
        D = EPDEvaluator(denoiser, labels)
        x, history, losses = states[0], (), []
        result.trajectories += B
        for n in range(N - 1):
            opt.zero_grad(set_to_none=True)
            out = epd_step(D, x, t_steps[n], t_steps[n + 1], params(n), afs_step=cfg.afs and n == 0, history=history,
                           max_order=max_order, batched=cfg.batched)
            loss = ((out.x - states[n + 1]) ** 2).sum() / B
            if cfg.loss_weighting == "relative":
                loss = loss / (((states[n + 1] - states[n]) ** 2).sum() / B)
            loss.backward()
            for p in params.parameters():
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            opt.step()
            result.updates += 1
            value = float(loss.detach())
            losses.append(value)
            x = states[n + 1] if cfg.restart == "teacher" else out.x.detach()
            history = out.history
            if callback is not None:
                c = out.coefficients
                callback(EPDTrainProgress(batch=k, step=n, loss=value, r_mean=float(c.r.detach().mean()),
                                          weight_max=float(c.weight.detach().max()),
                                          scale_dir_mean=float(c.scale_dir.detach().mean()),
                                          scale_time_mean=float(c.scale_time.detach().mean()),
                                          trajectories=result.trajectories, seconds=time.perf_counter() - t0))
        result.losses.append(losses)
    params.eval().requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Files: the raw tables in safetensors, the hyperparameters (and what the sampler needs) in JSON

PARAMS_FILE = "epd.safetensors"
CONFIG_FILE = "epd.json"
_FORMAT = "epd-params"


def epd_files(params: EPDParams, sampler: dict | None = None) -> dict[str, bytes]:
    """{"epd.safetensors": the four raw tables, "epd.json": {"format", "version", "params": config, "sampler"}}.

    ``sampler`` is any JSON-able description of the run the tables are for (solver, sigmas, afs, max_order, ...);
    it is stored as given. Equal tables give equal bytes (one safetensors metadata key)."""
    from safetensors.torch import save as st_save

    cfg = params.config()
    tensors = {name: getattr(params, name).detach().to("cpu").contiguous() for name in EPDParams.TABLES}
    about = json.dumps({"format": _FORMAT, **cfg}, sort_keys=True)
    doc = {"format": _FORMAT, "version": 1, "params": cfg, "sampler": sampler or {}}
    return {PARAMS_FILE: st_save(tensors, metadata={"amed": about}),
            CONFIG_FILE: (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()}


def epd_from_files(files) -> tuple[EPDParams, dict]:
    """Inverse of :func:`epd_files`: (EPDParams in the stored dtype, the stored sampler description). Never unpickles."""
    from safetensors.torch import load as st_load

    for name in (PARAMS_FILE, CONFIG_FILE):
        if name not in files:
            raise ValueError(f"EPD checkpoint lacks {name}")
    doc = json.loads(bytes(files[CONFIG_FILE]).decode())
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{CONFIG_FILE} is not an EPD parameter file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != 1:
        raise ValueError(f"unsupported EPD parameter file version {doc.get('version')!r}")
    cfg = doc["params"]
    tensors = st_load(bytes(files[PARAMS_FILE]))
    missing = set(EPDParams.TABLES) - set(tensors)
    if missing:
        raise ValueError(f"{PARAMS_FILE} lacks tables {sorted(missing)}")
    shape = (int(cfg["num_steps"]) - 1, int(cfg["num_points"]))
    for name in EPDParams.TABLES:
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"table {name} has shape {tuple(tensors[name].shape)}, the config says {shape}")
    params = EPDParams.from_raw(*(tensors[n] for n in EPDParams.TABLES), scale_dir=float(cfg["scale_dir"]),
                                scale_time=float(cfg["scale_time"]), fcn=bool(cfg["fcn"]),
                                dtype=tensors["r_params"].dtype)
    return params.eval().requires_grad_(False), dict(doc.get("sampler") or {})


def save_epd(directory, params: EPDParams, sampler: dict | None = None):
    """Write epd.safetensors and epd.json into ``directory`` (each atomically); returns the folder's Path."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in epd_files(params, sampler).items():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, folder / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return folder


def load_epd(directory) -> tuple[EPDParams, dict]:
    """Read what :func:`save_epd` wrote: (EPDParams, sampler description)."""
    from pathlib import Path

    folder = Path(directory)
    return epd_from_files({name: (folder / name).read_bytes() for name in (PARAMS_FILE, CONFIG_FILE)})


__all__ += ["EPDTrainConfig", "EPDTrainProgress", "EPDTrainResult", "train_epd", "epd_files", "epd_from_files",
            "save_epd", "load_epd", "PARAMS_FILE", "CONFIG_FILE"]
