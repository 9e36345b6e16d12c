"""AMED-Solver and AMED-Plugins (Zhou et al., arXiv 2312.00094, sec. 3.2-3.4), one step at a time.

Every interval [t_cur, t_next] gets one learned intermediate time s = t_next^r t_cur^(1-r) and two
denoiser evaluations (at t_cur, and at a * s), so NFE = 2 (N - 1), minus one with AFS (the first
evaluation is replaced by d = x / sqrt(1 + t^2)). The policy (r, c = scale_dir, a = scale_time) is
evaluated between the two, on the features captured during the evaluation at t_cur (zeros on the AFS step).

- ``amed`` (AMED-Solver): y = x + (s - t_cur) d_cur;  g = (y - D(y; a s)) / s;  x_next = x + c (t_next - t_cur) g.
- ``amed+euler``: two Euler steps t_cur -> s -> t_next, the second scaled by c.
- ``amed+dpm``: DPM-Solver-2 with its midpoint at s: x_next = x + c (t_next - t_cur) [g / (2r) + (1 - 1/(2r)) d_cur].
- ``amed+ipndm``: iPNDM (fixed Adams-Bashforth coefficients, history of up to max_order - 1 directions)
  on the refined grid t_0, s_0, t_1, s_1, ...; the step into t_next is scaled by c.
- ``amed+dpmpp``: multistep DPM-Solver++ on the refined grid (history of 3, orders lowered at the
  end with lower_order_final), the step into t_next scaled by c; with predict_x0 the data predictions
  are dynamically thresholded, as in the reference.
- ``amed+deis``, ``amed+unipc`` (ours; the reference has plugins on Euler, DPM-Solver-2, iPNDM and DPM-Solver++
  only): DEIS (tAB / rhoAB) and UniPC (bh1 / bh2, predictor-corrector) on the refined grid, built like ``amed+dpmpp``;
  their step weights are computed per sample (the learned times s differ per sample,
  :func:`amed_core.solvers.deis.deis_step_weights`, :func:`amed_core.solvers.unipc.unipc_step_weights`). UniPC's
  corrector at a point needs the evaluation there, so the state a UniPC step hands on (and training compares with
  the teacher) is the *predicted* x at t_next; the step that evaluates at t_next applies the pending correction
  first (the free solver's arithmetic on the refined grid, step for step). Its final step is never corrected and
  the warm-up corrector of very short grids is not spent (``warmup_final_corrector=False``).

Single-evaluation steps (ours, ``single_steps``: indices of coarse steps): such a step spends one evaluation, at
t_cur, and moves with the base solver's own update straight to t_next (no policy output), so NFE = 2 (N - 1) - afs -
len(single_steps). With them an AMED sampler can sit on the grid of a training-free winner at any NFE (an odd NFE
without AFS: one single step), and with the policy's r at the winner's intermediate points it reproduces the
winner exactly (:mod:`amed_core.families.init`).

Multistep plugins take ``afs_in_history`` (default True, the reference): False keeps the AFS estimate
out of the history, so later sub-steps never extrapolate from it (it is biased whenever the data are not
zero-mean with unit variance, e.g. digits in [-1, 1]; see BENCHMARKS.md "AMED quality").

Each step is a pure function ``step(ctx, x_cur, i, history) -> StepOut`` so that sampling (the loops
below, registered as solvers) and training (:mod:`amed_core.amed.train`, one interval per optimiser
step) run the same arithmetic. History entries are detached, as in the reference.

The facts about each solver (evaluations per step, base solver, multistep, default schedule) are in the
method table, :mod:`amed_core.methods.table`; its default options are the keyword defaults below.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch

from ..base_denoiser import FEATURE_SIZE
from ..solvers import (COMMON_OPTIONS, Callback, Counter, SolveResult, StepInfo, afs_direction, check_int_option,
                       check_thresholding, dpmpp_update, dynamic_threshold, finish, ipndm_combination, multistep_order, prepare)
from ..solvers.deis import DEIS_MODES, deis_step_weights
from ..solvers.multistep import combine
from ..solvers.unipc import VARIANTS, unipc_step_weights

__all__ = ["AMED_SOLVERS", "STEPS", "StepContext", "StepOut", "History", "make_context", "resolve_options", "step_defaults",
           "amed", "amed_euler", "amed_dpm", "amed_ipndm", "amed_dpmpp", "amed_deis", "amed_unipc", "single_step_count"]


@dataclass(frozen=True)
class History:
    """What a multistep plugin carries between intervals (model outputs and their times, oldest first)."""

    models: tuple = ()
    times: tuple = ()
    pending: tuple | None = None   # amed+unipc: (x, a, weights) of the correction the next evaluation completes


@dataclass
class StepOut:
    x: torch.Tensor
    history: History
    r: torch.Tensor
    scale_dir: torch.Tensor
    scale_time: torch.Tensor
    denoised: Optional[torch.Tensor]


@dataclass
class StepContext:
    """Everything a step needs besides the state: counted denoiser, grid, policy and solver options."""

    D: Counter
    t_steps: torch.Tensor
    policy: Callable
    afs: bool
    options: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.t_steps.shape[0])

    @property
    def single(self) -> frozenset:
        """Indices of the single-evaluation steps (``single_steps``)."""
        return frozenset(self.options.get("single_steps") or ())

    def sub_index(self, i: int) -> int:
        """Position of t_cur of step ``i`` on the refined grid (t_0, s_0, t_1, ...; a single step has no s_i)."""
        return sum(1 if j in self.single else 2 for j in range(i))

    @property
    def refined_points(self) -> int:
        return self.sub_index(self.num_steps - 1) + 1


def _evaluate_with_features(ctx: StepContext, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor | None]:
    """D(x; t) and the AMED features of this evaluation (None when the denoiser has no feature tap)."""
    capture = getattr(ctx.D.denoiser, "capture_features", None)
    if capture is None:
        return ctx.D(x, t), None
    with capture() as tap:
        denoised = ctx.D(x, t)
    return denoised, tap.value


def _first_direction(ctx: StepContext, x_cur, t_cur, i):
    """d_cur at t_cur (AFS on the first step when enabled), the denoised estimate (None on AFS) and features."""
    if ctx.afs and i == 0:
        feats = torch.zeros(x_cur.shape[0], FEATURE_SIZE, FEATURE_SIZE, dtype=x_cur.dtype, device=x_cur.device)
        return afs_direction(x_cur, t_cur), None, feats
    denoised, feats = _evaluate_with_features(ctx, x_cur, t_cur)
    if feats is None:
        if getattr(ctx.policy, "needs_features", False):
            raise ValueError("this policy needs AMED features but the denoiser has no capture_features(); "
                             "wrap it in a BaseDenoiser adapter")
        feats = torch.zeros(x_cur.shape[0], FEATURE_SIZE, FEATURE_SIZE, dtype=x_cur.dtype, device=x_cur.device)
    return (x_cur - denoised) / t_cur, denoised, feats


def _predict(ctx: StepContext, feats, t_cur, t_next, i, like: torch.Tensor):
    r, sd, st = ctx.policy(feats.to(like.dtype), t_cur, t_next, i)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return tuple(v.to(like.dtype).reshape(shape) for v in (r, sd, st))


def _no_policy(like: torch.Tensor):
    """(r, scale_dir, scale_time) of a single-evaluation step: no policy output (ones, for the statistics)."""
    one = torch.ones(like.shape[0], *([1] * (like.ndim - 1)), dtype=like.dtype, device=like.device)
    return one, one, one


def _mid(t_cur, t_next, r):
    """s = t_next^r * t_cur^(1 - r)."""
    return t_next**r * t_cur ** (1 - r)


# -- single-step solvers --------------------------------------------------------------------------

class Midpoint(NamedTuple):
    """Where every single-step AMED step stands after its Euler sub-step to the learned time s (see :func:`to_midpoint`)."""

    t_cur: torch.Tensor
    t_next: torch.Tensor
    d_cur: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor       # scale_dir
    a: torch.Tensor       # scale_time
    s: torch.Tensor
    y: torch.Tensor
    denoised: torch.Tensor


def to_midpoint(ctx: StepContext, x_cur, i) -> Midpoint:
    """The start the single-step AMED steps share: d_cur at t_cur (AFS on the first step), the policy's (r, c, a) on
    its features, s = t_next^r t_cur^(1-r), y = x + (s - t_cur) d_cur and D(y; a s)."""
    t_cur, t_next = ctx.t_steps[i], ctx.t_steps[i + 1]
    d_cur, _, feats = _first_direction(ctx, x_cur, t_cur, i)
    r, c, a = _predict(ctx, feats, t_cur, t_next, i, x_cur)
    s = _mid(t_cur, t_next, r)
    y = x_cur + (s - t_cur) * d_cur
    return Midpoint(t_cur, t_next, d_cur, r, c, a, s, y, ctx.D(y, (a * s).reshape(-1)))


def _single_euler(ctx: StepContext, x_cur, i, history: History) -> StepOut:
    """A single-evaluation step of the single-step solvers: Euler, x_next = x + (t_next - t_cur) d_cur."""
    t_cur, t_next = ctx.t_steps[i], ctx.t_steps[i + 1]
    d_cur, denoised, _ = _first_direction(ctx, x_cur, t_cur, i)
    return StepOut(x_cur + (t_next - t_cur) * d_cur, history, *_no_policy(x_cur), denoised)


def step_amed(ctx: StepContext, x_cur, i, history: History) -> StepOut:
    """AMED-Solver: y = x + (s - t_cur) d_cur; g = (y - D(y; a s)) / s; x_next = x + c (t_next - t_cur) g."""
    if i in ctx.single:
        return _single_euler(ctx, x_cur, i, history)
    m = to_midpoint(ctx, x_cur, i)
    g = (m.y - m.denoised) / m.s
    x_next = x_cur + m.c * (m.t_next - m.t_cur) * g
    return StepOut(x_next, history, m.r, m.c, m.a, m.denoised)


def step_euler(ctx: StepContext, x_cur, i, history: History) -> StepOut:
    """AMED-Plugin on Euler: y = x + (s - t_cur) d_cur; x_next = y + c (t_next - s) (y - D(y; a s)) / s."""
    if i in ctx.single:
        return _single_euler(ctx, x_cur, i, history)
    m = to_midpoint(ctx, x_cur, i)
    x_next = m.y + m.c * (m.t_next - m.s) * (m.y - m.denoised) / m.s
    return StepOut(x_next, history, m.r, m.c, m.a, m.denoised)


def step_dpm(ctx: StepContext, x_cur, i, history: History) -> StepOut:
    """AMED-Plugin on DPM-Solver-2: x_next = x + c (t_next - t_cur) [g / (2r) + (1 - 1/(2r)) d_cur]."""
    if i in ctx.single:
        return _single_euler(ctx, x_cur, i, history)
    m = to_midpoint(ctx, x_cur, i)
    g = (m.y - m.denoised) / m.s
    r = m.r
    x_next = x_cur + m.c * (m.t_next - m.t_cur) * ((1 / (2 * r)) * g + (1 - 1 / (2 * r)) * m.d_cur)
    return StepOut(x_next, history, m.r, m.c, m.a, m.denoised)


# -- multistep solvers ----------------------------------------------------------------------------

def _push(models: tuple, value: torch.Tensor, keep: int) -> tuple:
    """Append a detached history entry, keeping the newest ``keep`` (keep=0: no history)."""
    if keep <= 0:
        return ()
    return (tuple(models) + (value.detach(),))[-keep:]


def step_ipndm(ctx: StepContext, x_cur, i, history: History) -> StepOut:
    """AMED-Plugin on iPNDM: Adams-Bashforth combinations of d at t_cur -> s, then of g at s -> t_next (scaled by c)."""
    max_order = ctx.options["max_order"]
    keep = max_order - 1
    t_cur, t_next = ctx.t_steps[i], ctx.t_steps[i + 1]
    d_cur, den_cur, feats = _first_direction(ctx, x_cur, t_cur, i)
    hist = list(history.models)
    order = min(max_order, len(hist) + 1)
    keep_afs = not (ctx.afs and i == 0) or ctx.options["afs_in_history"]
    if i in ctx.single:  # plain iPNDM: x_next = x + (t_next - t_cur) AB(d_cur, history)
        x_next = x_cur + (t_next - t_cur) * ipndm_combination(d_cur, hist, order)
        new = _push(tuple(hist), d_cur, keep) if keep_afs else tuple(hist)
        return StepOut(x_next, History(new), *_no_policy(x_cur), den_cur)
    r, c, a = _predict(ctx, feats, t_cur, t_next, i, x_cur)
    s = _mid(t_cur, t_next, r)
    y = x_cur + (s - t_cur) * ipndm_combination(d_cur, hist, order)
    if keep_afs:
        hist = list(_push(tuple(hist), d_cur, keep))
    order = min(max_order, len(hist) + 1)
    denoised = ctx.D(y, (a * s).reshape(-1))
    g = (y - denoised) / s
    x_next = y + c * (t_next - s) * ipndm_combination(g, hist, order)
    return StepOut(x_next, History(_push(tuple(hist), g, keep)), r, c, a, denoised)


def step_dpmpp(ctx: StepContext, x_cur, i, history: History) -> StepOut:
    """AMED-Plugin on multistep DPM-Solver++ over the refined grid (2N - 1 points), the step into t_next scaled by c."""
    o = ctx.options
    max_order, predict_x0, lof = o["max_order"], o["predict_x0"], o["lower_order_final"]
    thr = dynamic_threshold if o["dynamic_thresholding"] else (lambda v: v)
    total, k = ctx.refined_points, ctx.sub_index(i)
    t_cur, t_next = ctx.t_steps[i], ctx.t_steps[i + 1]
    d_cur, denoised, feats = _first_direction(ctx, x_cur, t_cur, i)
    den_cur = denoised
    if denoised is None:  # AFS: the implied data prediction
        denoised = x_cur - t_cur * d_cur
    models = list(history.models) + [thr(denoised) if predict_x0 else d_cur]
    times = list(history.times) + [t_cur.reshape(1)]
    if i in ctx.single:  # plain multistep DPM-Solver++: t_cur -> t_next, sub-step k of the refined grid
        order = min(multistep_order(k, total, max_order, lof), len(models))
        x_next = dpmpp_update(x_cur, models, times, t_next, order, predict_x0=predict_x0)
        if ctx.afs and i == 0 and not o["afs_in_history"]:
            models, times = [], []
        hist = History(tuple(m.detach() for m in models[-3:]), tuple(t.detach() for t in times[-3:]))
        return StepOut(x_next, hist, *_no_policy(x_cur), den_cur)
    r, c, a = _predict(ctx, feats, t_cur, t_next, i, x_cur)
    s = _mid(t_cur, t_next, r)
    # t_cur -> s: sub-step k of the refined grid
    order = min(multistep_order(k, total, max_order, lof), len(models))  # (shorter history without AFS entry)
    y = dpmpp_update(x_cur, models, times, s, order, predict_x0=predict_x0)
    # s -> t_next: sub-step k + 1
    if ctx.afs and i == 0 and not o["afs_in_history"]:
        models, times = [], []  # the AFS estimate is not extrapolated from
    den_mid = ctx.D(y, (a * s).reshape(-1))
    models.append(thr(den_mid) if predict_x0 else (y - den_mid) / s)
    times.append(s)
    order = min(multistep_order(k + 1, total, max_order, lof), len(models))
    x_next = dpmpp_update(y, models, times, t_next, order, predict_x0=predict_x0, scale=c)
    hist = History(tuple(m.detach() for m in models[-3:]), tuple(t.detach() for t in times[-3:]))
    return StepOut(x_next, hist, r, c, a, den_mid)


def _w(v, like: torch.Tensor):
    """A per-sample (``(B,)``) or shared (0-d) step weight, broadcast against ``like`` and in its dtype."""
    v = v.to(dtype=like.dtype, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def _trim(models: list, times: list, keep: int) -> tuple[tuple, tuple]:
    """The newest ``keep`` history entries, detached (as the reference does with its buffers)."""
    if keep <= 0:
        return (), ()
    return tuple(m.detach() for m in models[-keep:]), tuple(t.detach() for t in times[-keep:])


def step_deis(ctx: StepContext, x_cur, i, history: History) -> StepOut:
    """AMED-Plugin on DEIS (ours) over the refined grid: x_next = x + sum_j C_j d_{n-j} with the weights of the
    directions' own (per-sample) times, :func:`amed_core.solvers.deis.deis_step_weights`; the step into t_next scaled by c."""
    o = ctx.options
    max_order, mode, keep = o["max_order"], o["deis_mode"], o["max_order"] - 1
    k = ctx.sub_index(i)
    t_cur, t_next = ctx.t_steps[i], ctx.t_steps[i + 1]
    d_cur, den_cur, feats = _first_direction(ctx, x_cur, t_cur, i)
    dirs, times = list(history.models) + [d_cur], list(history.times) + [t_cur.reshape(-1)]
    keep_afs = not (ctx.afs and i == 0) or o["afs_in_history"]

    def move(x, t_to, kk, scale=None):
        order = min(max_order, kk + 1, len(dirs))
        w = deis_step_weights(times[-order:], t_to, mode)
        upd = combine(None, 1.0, [(_w(wj, x), dirs[-1 - j]) for j, wj in enumerate(w)])
        return x + (upd if scale is None else scale * upd)

    if i in ctx.single:
        x_next = move(x_cur, t_next, k)
        if not keep_afs:
            dirs, times = [], []
        return StepOut(x_next, History(*_trim(dirs, times, keep)), *_no_policy(x_cur), den_cur)
    r, c, a = _predict(ctx, feats, t_cur, t_next, i, x_cur)
    s = _mid(t_cur, t_next, r)
    y = move(x_cur, s.reshape(-1), k)
    if not keep_afs:
        dirs, times = [], []
    den_mid = ctx.D(y, (a * s).reshape(-1))
    dirs.append((y - den_mid) / s)
    times.append(s.reshape(-1))
    dirs, times = dirs[-max_order:], times[-max_order:]
    x_next = move(y, t_next, k + 1, scale=c)
    return StepOut(x_next, History(*_trim(dirs, times, keep)), r, c, a, den_mid)


def step_unipc(ctx: StepContext, x_in, i, history: History) -> StepOut:
    """AMED-Plugin on UniPC (ours) over the refined grid: each sub-step predicts (UniP), the next evaluation corrects
    (UniC) and is reused, as the free solver does; the evaluation at t_cur (which yields the features) also completes
    the correction the previous step left pending (:attr:`History.pending`); the step into t_next scaled by c."""
    o = ctx.options
    max_order, predict_x0, lof, variant = o["max_order"], o["predict_x0"], o["lower_order_final"], o["variant"]
    thr = dynamic_threshold if o["dynamic_thresholding"] else (lambda v: v)
    total, k = ctx.refined_points, ctx.sub_index(i)
    t_cur, t_next = ctx.t_steps[i], ctx.t_steps[i + 1]
    d_cur, den_cur, feats = _first_direction(ctx, x_in, t_cur, i)
    denoised = den_cur if den_cur is not None else x_in - t_cur * d_cur
    models, times = list(history.models), list(history.times)
    x_cur = x_in
    if history.pending is not None:  # UniC at t_cur with the evaluation just made
        px, pa, pw = history.pending
        x_cur = combine(px, _w(pa, px), [(_w(w, px), models[-1 - j]) for j, w in enumerate(pw[:-1])]
                        + [(_w(pw[-1], px), thr(denoised) if predict_x0 else (x_in - denoised) / t_cur)])
    models.append(thr(denoised) if predict_x0 else (x_in - denoised) / t_cur)
    times.append(t_cur.reshape(-1))
    models, times = models[-max_order:], times[-max_order:]
    drop_afs = ctx.afs and i == 0 and not o["afs_in_history"]

    def predict(x, t_to, kk, corrector, scale=None):
        order = min(multistep_order(kk, total, max_order, lof), len(models))
        a, pred, corr = unipc_step_weights(times[-order:], t_to, order, predict_x0=predict_x0, variant=variant,
                                           corrector=corrector)
        if scale is not None:
            sc = scale.reshape(-1) if scale.ndim else scale
            pred = [sc.to(w.dtype) * w for w in pred]
            corr = None if corr is None else [sc.to(w.dtype) * w for w in corr]
        x_pred = combine(x, _w(a, x), [(_w(w, x), models[-1 - j]) for j, w in enumerate(pred)])
        return x_pred, (None if corr is None else (x.detach(), a.detach(), tuple(w.detach() for w in corr)))

    if i in ctx.single:
        x_next, pending = predict(x_cur, t_next, k, corrector=k < total - 2 and not drop_afs)
        if drop_afs:
            models, times = [], []
        return StepOut(x_next, History(*_trim(models, times, max_order), pending), *_no_policy(x_in), den_cur)
    r, c, a = _predict(ctx, feats, t_cur, t_next, i, x_in)
    s = _mid(t_cur, t_next, r)
    y_pred, pending = predict(x_cur, s.reshape(-1), k, corrector=not drop_afs)
    den_mid = ctx.D(y_pred, (a * s).reshape(-1))
    m_s = thr(den_mid) if predict_x0 else (y_pred - den_mid) / s
    y = y_pred
    if drop_afs:  # the AFS estimate is not extrapolated from (nor corrected with)
        models, times = [], []
    else:
        px, pa, pw = pending
        y = combine(x_cur, _w(pa, x_cur), [(_w(w, x_cur), models[-1 - j]) for j, w in enumerate(pw[:-1])]
                    + [(_w(pw[-1], x_cur), m_s)])
    models = (models + [m_s])[-max_order:]
    times = (times + [s.reshape(-1)])[-max_order:]
    x_next, pending = predict(y, t_next, k + 1, corrector=k + 1 < total - 2, scale=c)
    return StepOut(x_next, History(*_trim(models, times, max_order), pending), r, c, a, den_mid)


# -- option handling and the solver loops ---------------------------------------------------------

def step_defaults(name: str) -> dict:
    """The options of AMED solver ``name`` and their defaults: the keyword defaults of its public function."""
    if name not in STEPS:
        raise ValueError(f"unknown AMED solver {name!r}; choose one of {sorted(STEPS)}")
    params = inspect.signature(AMED_SOLVERS[name]).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in COMMON_OPTIONS and p.name != "policy"}


def resolve_options(name: str, **options) -> dict:
    """Options of AMED solver ``name``, checked, with defaults for the missing or None ones (dynamic_thresholding
    None = follow predict_x0). An option the solver does not take raises unless it is None."""
    defaults = step_defaults(name)
    for k, v in options.items():
        if k not in defaults and v is not None:
            owners = sorted(n for n in STEPS if k in step_defaults(n))
            raise ValueError(f"{k} does not apply to {name!r} (only {', '.join(owners) or 'none'})")
    opts = {k: d if options.get(k) is None else options[k] for k, d in defaults.items()}
    if "afs_in_history" in opts and not isinstance(opts["afs_in_history"], bool):
        raise ValueError(f"afs_in_history must be true or false, got {opts['afs_in_history']!r}")
    if name in ("amed+ipndm", "amed+deis"):
        check_int_option("max_order", opts["max_order"], 1, 4)
    if name in ("amed+dpmpp", "amed+unipc"):
        check_int_option("max_order", opts["max_order"], 1, 3)
        for k in ("predict_x0", "lower_order_final"):
            if not isinstance(opts[k], bool):
                raise ValueError(f"{k} must be true or false, got {opts[k]!r}")
        opts["dynamic_thresholding"] = check_thresholding(opts["dynamic_thresholding"], opts["predict_x0"])
    if name == "amed+deis" and opts["deis_mode"] not in DEIS_MODES:
        raise ValueError(f"deis_mode must be one of {DEIS_MODES}, got {opts['deis_mode']!r}")
    if name == "amed+unipc" and opts["variant"] not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {opts['variant']!r}")
    opts["single_steps"] = _single_steps(opts["single_steps"])
    return opts


def _single_steps(value) -> tuple[int, ...]:
    """``single_steps`` as a sorted tuple of distinct step indices (ValueError naming the field)."""
    try:
        steps = tuple(value)
    except TypeError:
        raise ValueError(f"single_steps must be a list of step indices (0 = the first step), got {value!r}") from None
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"single_steps must be distinct step indices >= 0 (0 = the first step), got {list(steps)}")
    return tuple(sorted(steps))


def single_step_count(options) -> int:
    """How many single-evaluation steps ``options`` asks for (their NFE saving: one each)."""
    return len((options or {}).get("single_steps") or ())


STEPS = {"amed": step_amed, "amed+euler": step_euler, "amed+dpm": step_dpm, "amed+ipndm": step_ipndm, "amed+dpmpp": step_dpmpp,
         "amed+deis": step_deis, "amed+unipc": step_unipc}


def make_context(name: str, denoiser, x, sigmas, *, policy, class_labels=None, afs=False, **options) -> StepContext:
    """Validate options (:func:`resolve_options`) and build the per-run context of solver ``name`` (shared by
    sampling and training)."""
    if name not in STEPS:
        raise ValueError(f"unknown AMED solver {name!r}; choose one of {sorted(STEPS)}")
    if policy is None or not callable(policy):
        raise ValueError(f"solver {name!r} needs policy= (an AMEDPredictor, a FixedPolicy or any callable policy)")
    opts = resolve_options(name, **options)
    t_steps = prepare(x, sigmas)
    if opts["single_steps"] and opts["single_steps"][-1] >= t_steps.shape[0] - 1:
        raise ValueError(f"single_steps {list(opts['single_steps'])}: the grid has {t_steps.shape[0] - 1} steps "
                         f"(indices 0..{t_steps.shape[0] - 2})")
    return StepContext(Counter(denoiser, class_labels), t_steps, policy, bool(afs), opts)


def _run(name: str, denoiser, x, sigmas, *, policy, class_labels, afs, denoise_to_zero, return_trajectory, callback,
         **options) -> SolveResult:
    ctx = make_context(name, denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs, **options)
    step = STEPS[name]
    states = [x] if return_trajectory else None
    history = History()
    x_next = x
    for i in range(ctx.num_steps - 1):
        out = step(ctx, x_next, i, history)
        x_next, history = out.x, out.history
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(i, float(ctx.t_steps[i]), float(ctx.t_steps[i + 1]), x_next, out.denoised, ctx.D.nfe))
    return finish(x_next, states, ctx.D, denoise_to_zero, ctx.t_steps[-1], return_trajectory)


def amed(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
         callback: Callback | None = None, single_steps=()) -> SolveResult:
    """AMED-Solver (arXiv 2312.00094, eq. 12): a learned mean-value-theorem midpoint per step; 2 NFE per step
    (``single_steps``: steps that make one Euler step instead, ours)."""
    return _run("amed", denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs,
                denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory, callback=callback,
                single_steps=single_steps)


def amed_euler(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False,
               return_trajectory=False, callback: Callback | None = None, single_steps=()) -> SolveResult:
    """AMED-Plugin on Euler (arXiv 2312.00094, sec. 3.4): t_cur -> s -> t_next, the second step scaled."""
    return _run("amed+euler", denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs,
                denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory, callback=callback,
                single_steps=single_steps)


def amed_dpm(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False,
             return_trajectory=False, callback: Callback | None = None, single_steps=()) -> SolveResult:
    """AMED-Plugin on DPM-Solver-2 (arXiv 2312.00094, sec. 3.4): its intermediate point is learned."""
    return _run("amed+dpm", denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs,
                denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory, callback=callback,
                single_steps=single_steps)


def amed_ipndm(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False,
               return_trajectory=False, callback: Callback | None = None, max_order=4, afs_in_history=True,
               single_steps=()) -> SolveResult:
    """AMED-Plugin on iPNDM (arXiv 2312.00094, sec. 3.4) with max_order in 1..4.

    afs_in_history=False keeps the AFS direction out of the Adams-Bashforth history (it is used for the
    first sub-step only); True is the reference's behaviour.
    """
    return _run("amed+ipndm", denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs,
                denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory, callback=callback,
                max_order=max_order, afs_in_history=afs_in_history, single_steps=single_steps)


def amed_dpmpp(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False,
               return_trajectory=False, callback: Callback | None = None, max_order=3, predict_x0=True,
               lower_order_final=True, dynamic_thresholding=None, afs_in_history=True, single_steps=()) -> SolveResult:
    """AMED-Plugin on multistep DPM-Solver++ (arXiv 2312.00094, sec. 3.4); dynamic_thresholding None = predict_x0.

    afs_in_history=False: the AFS data estimate serves the first sub-step only (True: the reference).
    """
    return _run("amed+dpmpp", denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs,
                denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory, callback=callback,
                max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                dynamic_thresholding=dynamic_thresholding, afs_in_history=afs_in_history, single_steps=single_steps)


def amed_deis(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False,
              return_trajectory=False, callback: Callback | None = None, max_order=4, deis_mode="tab",
              afs_in_history=True, single_steps=()) -> SolveResult:
    """AMED-Plugin on DEIS (ours: the reference has none), tAB or rhoAB, max_order in 1..4; see the module docstring."""
    return _run("amed+deis", denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs,
                denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory, callback=callback,
                max_order=max_order, deis_mode=deis_mode, afs_in_history=afs_in_history, single_steps=single_steps)


def amed_unipc(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False,
               return_trajectory=False, callback: Callback | None = None, max_order=3, predict_x0=True,
               lower_order_final=True, dynamic_thresholding=None, variant="bh2", afs_in_history=True,
               single_steps=()) -> SolveResult:
    """AMED-Plugin on UniPC (ours: the reference has none), bh1 / bh2, max_order in 1..3; the final step is never
    corrected (the free solver's ``warmup_final_corrector=False``); see the module docstring."""
    return _run("amed+unipc", denoiser, x, sigmas, policy=policy, class_labels=class_labels, afs=afs,
                denoise_to_zero=denoise_to_zero, return_trajectory=return_trajectory, callback=callback,
                max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                dynamic_thresholding=dynamic_thresholding, variant=variant, afs_in_history=afs_in_history,
                single_steps=single_steps)


AMED_SOLVERS: dict[str, Callable[..., SolveResult]] = {
    "amed": amed, "amed+euler": amed_euler, "amed+dpm": amed_dpm, "amed+ipndm": amed_ipndm, "amed+dpmpp": amed_dpmpp,
    "amed+deis": amed_deis, "amed+unipc": amed_unipc,
}
