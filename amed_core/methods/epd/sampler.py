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

(Over 400 lines on purpose: one job, the sampler; most of it is this docstring and the parameter mapping the golden
cases pin. Training and checkpoint files are in :mod:`amed_core.methods.epd.train`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ...schedules import check_grid
from ...solvers import SolveResult, StepInfo, ipndm_combination

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
