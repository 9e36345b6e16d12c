"""GITS: geometry-inspired time scheduling (Chen et al., ICML 2024, "On the Trajectory Regularity of
ODE-based Diffusion Sampling"), as the reference ``zju-pi/diff-sampler gits-main`` computes it.

Notation (the paper's, EDM's sigma = t):

- Teacher grid t_0 > t_1 > ... > t_{N-1} (``t_steps_tea``, N points, e.g. ``get_schedule(21, ...)``).
- Warm-up: R rounds of B latents; round r's teacher runs ``teacher_solver`` from ``noise[r] * t_0`` and gives the
  points X_0 .. X_{N-1} and the first-stage slopes d_i = (X_i - D(X_i; t_i)) / t_i, i = 0 .. N-2 (with AFS,
  d_0 = X_0 / sqrt(1 + t_0^2)); E = X_{N-1} (or D(X_{N-1}; t_{N-1}) with ``denoise_to_zero``, see below).
- Cost of the Euler jump i -> j (i < j): Y_ij = X_i + (t_j - t_i) d_i and
  ``l2``: mean_b ||Y_ij - X_j||_2, ``l1``: mean_b ||Y_ij - X_j||_1,
  ``dev``: mean_b dev_b(Y_ij) - dev_T(j), with dev_b(P) the distance of P from the line through X_0 and E
  (of sample b) and dev_T(j) = mean_b dev_b(X_j) (0 for j = N-1). Summed over rounds, divided by R.
- DP (K = M - 1 jumps, coefficient c): minimise cost(0, i_1) + c cost(i_1, i_2) + ... + c^(K-1) cost(i_{K-1}, N-1).
- Free step (AFS only): with phi the DP's indices, try k = 1 .. phi[1]-1, i.e. the student (with AFS) on
  t_tea[[0, k] + phi[1:]], and keep the k whose final state is closest (mean L2) to the teacher's.

Public API: :class:`TeacherTrajectories`, :func:`teacher_trajectories`, :func:`first_stage_slopes`,
:func:`trajectory_deviation`, :func:`cost_matrix`, :func:`gits_dp`, :func:`dp_objective`,
:func:`free_step_search`, :func:`gits_schedule` -> :class:`GITSResult`, :func:`warmup_rounds`,
:func:`reported_nfe`, :func:`run_student`, :func:`schedule_to_sigmas`.

Where we follow the reference's quirks by default (each has an option that departs):

- **AFS reaches the teacher** (``teacher_afs=None`` = ``afs``). The reference passes one kwargs dict, so with
  ``afs`` the teacher also takes an analytical first step and row 0 of the cost uses that slope. Big first jumps then
  look expensive, the DP almost always picks phi[1] = 1, no free step is searched or inserted and the student makes one
  NFE fewer than the reference prints. ``teacher_afs=False`` runs an accurate teacher (the paper's intent), which lets
  the DP place a real first jump that the free-step search can then split.
- **The teacher inherits the student's options** (``teacher_options=None``): every student option the teacher solver
  accepts (max_order, r, predict_x0, ...) is passed on, as the reference's shared kwargs do. Pass a dict to choose.
- **Warm-up rounds** R = num_warmup // (max_batch_size + 1) + 1 (:func:`warmup_rounds`); this collects fewer than
  ``num_warmup`` trajectories for some values (129 with batch 64 gives 2 rounds = 128). ``exact=True`` gives
  ceil(num_warmup / max_batch_size).
- **The free-step search uses the last round only** (its latents and its teacher end point); ``search_on="all"``
  averages the distance over every round (needs the rounds kept, more memory).
- **Strict minimum from 999999** in the search: ties go to the smallest k; if every distance is >= ``dist_init``
  (or NaN) nothing is inserted.
- **denoise_to_zero reaches the teacher**: the teacher's last point becomes D(X_{N-1}; t_{N-1}), which is then the end
  point E of the dev line, the extra intermediate point X_{N-1} gets a dev_T(N-1) (instead of 0), and it is the search's
  target (the search's student also denoises to zero).

Where we depart (no option; the reference would crash or be ill-defined):

- **Stale num_steps.** The reference calls the student (and the search's student) with ``num_steps`` = M although
  ``t_steps`` has M+1 points after a free step; DPM-Solver++'s ``lower_order_final`` then asks for order 0 and crashes,
  and UniPC would skip its corrector one step early (its search crashes earlier: ``get_sampler_fn`` lacks unipc). Our
  solvers take the number of steps from the grid, so those runs are well defined here.
- **DEIS students in the search**: the reference stores the candidate's coefficient table into the wrong dict
  (``solver_kwargs`` instead of ``kwargs``), so a DEIS search would run with the teacher's table (or None). Ours
  computes coefficients from the grid it is given.
- **dtype**: the reference's cost matrix is float32 on GPU (``torch.zeros`` default dtype); ours is float64.
- **Shapes**: ``cal_deviation`` needs square images (H == W); ours takes any (B, ...) state.

The NFE the reference *prints* (:func:`reported_nfe`, ``sample.py``'s formula with the student's ``num_steps``) is
not always what the student makes (``SolveResult.nfe``): with ``afs`` and no inserted step it is one too many.

(Over 400 lines on purpose: one job, the GITS schedule search; its five steps (warm-up teacher, cost matrix, DP,
free-step search, student) share the trajectory types and the reference's quirks documented here, and the golden
cases pin them together. The family wrapper (fit, checkpoint, sampling) is :mod:`amed_core.families.gits`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..schedules import schedule_to_sigmas  # noqa: F401  (public here too: GITS users export their schedule)
from ..solvers import StepInfo
from .table import solve as _solve
from .table import solver_options as _solver_options

__all__ = [
    "CostMatrix", "GITSResult", "TeacherTrajectories", "METRICS", "cost_matrix", "dp_objective", "first_stage_slopes",
    "free_step_search", "gits_dp", "gits_schedule", "reported_nfe", "run_student", "schedule_to_sigmas",
    "teacher_trajectories",
    "trajectory_deviation", "warmup_rounds",
]

METRICS = ("dev", "l1", "l2")

# The reference's solver names that differ from ours.
_ALIASES = {"dpm": "dpm2", "dpm_2": "dpm2"}
# Options that gits_schedule sets itself and that are not the solver's own.
_RESERVED = ("class_labels", "afs", "denoise_to_zero", "return_trajectory", "callback")


def _solver_name(name: str) -> str:
    return _ALIASES.get(name, name)


def solve(name: str, denoiser, x, sigmas, **options):
    """Run a registered solver by name (the reference's ``dpm`` is accepted for ``dpm2``)."""
    return _solve(_solver_name(name), denoiser, x, sigmas, **options)


def solver_options(name: str) -> list[str]:
    return list(_solver_options(_solver_name(name)))


# ---------------------------------------------------------------------------------------------------------------
# Small helpers: warm-up size, printed NFE, sigma export.

def warmup_rounds(num_warmup: int, max_batch_size: int, *, world_size: int = 1, exact: bool = False) -> int:
    """Number of warm-up rounds R.

    Reference (default): ``num_warmup // (max_batch_size + 1) + 1`` (64/64 -> 1, 128/64 -> 2, 96/32 -> 3,
    256/64 -> 4; but 129/64 -> 2, i.e. 128 < 129 trajectories). ``exact=True``: ceil(num_warmup / (B * world_size))
    with B = max_batch_size // world_size, the fewest rounds that collect ``num_warmup`` trajectories.
    """
    if num_warmup < 1 or max_batch_size < 1 or world_size < 1:
        raise ValueError("num_warmup, max_batch_size and world_size must be positive")
    if not exact:
        return num_warmup // (max_batch_size + 1) + 1
    per_round = (max_batch_size // world_size) * world_size
    if per_round < 1:
        raise ValueError("max_batch_size must be at least world_size")
    return -(-num_warmup // per_round)


def reported_nfe(solver: str, num_steps: int, *, afs: bool = False, dp: bool = True, denoise_to_zero: bool = False,
                 cfg: bool = False) -> int:
    """The NFE the reference's ``sample.py`` prints (and names its output folder with), not a count of calls.

    ``num_steps`` is the student's M (the reference does not update it after a free step is inserted).
    dpm/heun: 2(M-1), +1 with afs under GITS (``dp``), -1 with afs otherwise; every other solver: M-1, -1 with afs
    only without GITS; +1 with ``denoise_to_zero``; doubled with classifier-free guidance (``cfg``).
    With afs and no inserted free step the student actually makes one NFE fewer than this.
    """
    name = _solver_name(solver)
    if name in ("dpm2", "heun"):
        nfe = 2 * (num_steps - 1)
        if afs:
            nfe = nfe + 1 if dp else nfe - 1
    else:
        nfe = num_steps - 1
        if afs and not dp:
            nfe -= 1
    if denoise_to_zero:
        nfe += 1
    if cfg:
        nfe *= 2
    return nfe


def run_student(denoiser, noise, t_steps, solver: str, *, afs: bool = False, denoise_to_zero: bool = False,
                class_labels=None, return_trajectory: bool = False, **options):
    """The student: our solver on the selected ``t_steps`` from ``noise * t_steps[0]`` (a ``SolveResult``).

    As ``sample.py`` calls it, except that the number of steps always comes from ``t_steps`` (the reference passes
    the stale ``num_steps`` = M, see the module docstring). ``SolveResult.nfe`` is what it actually spent; compare
    :func:`reported_nfe` for what the reference prints.
    """
    t = torch.as_tensor(t_steps, dtype=torch.float64)
    x = noise * t[0].to(device=noise.device, dtype=noise.dtype)
    return solve(solver, denoiser, x, t, class_labels=class_labels, afs=afs, denoise_to_zero=denoise_to_zero,
                 return_trajectory=return_trajectory, **options)


# ---------------------------------------------------------------------------------------------------------------
# Teacher trajectories and first-stage slopes.

@dataclass
class TeacherTrajectories:
    """R rounds of teacher trajectories on the fine grid.

    states: (R, N, B, *S) the points X_0 .. X_{N-1}; slopes: (R, N-1, B, *S) the first-stage slopes d_0 .. d_{N-2};
    final: (R, B, *S) the teacher's last point E (X_{N-1}, or D(X_{N-1}; t_{N-1}) when it denoised to zero);
    t_steps: (N,) float64; class_labels: per-round labels (or None); nfe: denoiser calls spent (all rounds).
    """

    states: torch.Tensor
    slopes: torch.Tensor
    t_steps: torch.Tensor
    final: Optional[torch.Tensor] = None
    class_labels: Optional[list] = None
    nfe: int = 0

    def __post_init__(self):
        if self.states.ndim < 3:
            raise ValueError(f"states must be (R, N, B, ...), got {tuple(self.states.shape)}")
        R, N = self.states.shape[:2]
        if self.slopes.shape != (R, N - 1, *self.states.shape[2:]):
            raise ValueError(f"slopes must be (R, N-1, B, ...) = {(R, N - 1, *self.states.shape[2:])}, "
                             f"got {tuple(self.slopes.shape)}")
        self.t_steps = torch.as_tensor(self.t_steps, dtype=torch.float64).reshape(-1)
        if self.t_steps.shape[0] != N:
            raise ValueError(f"t_steps has {self.t_steps.shape[0]} points but states have N={N}")
        if self.final is None:
            self.final = self.states[:, -1]
        if self.final.shape != (R, *self.states.shape[2:]):
            raise ValueError(f"final must be (R, B, ...), got {tuple(self.final.shape)}")

    @property
    def rounds(self) -> int:
        return int(self.states.shape[0])

    @classmethod
    def from_states(cls, denoiser, states, t_steps, *, afs: bool = False, class_labels=None,
                    final=None) -> "TeacherTrajectories":
        """Trajectories stored elsewhere (e.g. ``TeacherShard.states`` at ``shard.sigmas``; pass ``states[None]``
        for one round): the slopes are recomputed, N-1 evaluations per round (d_0 analytical with ``afs``)."""
        states = torch.as_tensor(states)
        if states.ndim < 4:
            raise ValueError("states must be (R, N, B, ...) (add a leading round axis for one round)")
        t = torch.as_tensor(t_steps, dtype=torch.float64)
        labels = _per_round(class_labels, states.shape[0])
        slopes, nfe = [], 0
        with torch.no_grad():
            for r in range(states.shape[0]):
                d, n = first_stage_slopes(denoiser, states[r], t, afs=afs, class_labels=labels[r], return_nfe=True)
                slopes.append(d)
                nfe += n
        return cls(states=states, slopes=torch.stack(slopes), t_steps=t, final=final, class_labels=labels, nfe=nfe)

    @classmethod
    def from_shard(cls, shard, denoiser, *, afs: bool = False, dtype: torch.dtype = torch.float64,
                   device: torch.device | str | None = None) -> "TeacherTrajectories":
        """One round from a stored :class:`amed_core.shards.TeacherShard` (states (G, B, ...) at ``shard.sigmas``),
        the fine grid being ``shard.sigmas``; labels become one-hot vectors when ``shard.label_dim`` > 0. The slopes
        are recomputed (G-1 evaluations; d_0 analytical with ``afs``, which should match how the teacher ran)."""
        states = shard.states.to(device=device, dtype=dtype)
        labels = None
        if getattr(shard, "labels", None) is not None and getattr(shard, "label_dim", 0):
            labels = torch.nn.functional.one_hot(shard.labels, shard.label_dim).to(device=states.device, dtype=dtype)
        return cls.from_states(denoiser, states.unsqueeze(0), shard.sigmas, afs=afs,
                               class_labels=None if labels is None else [labels])


def first_stage_slopes(denoiser, states, t_steps, *, afs: bool = False, class_labels=None, indices=None,
                       return_nfe: bool = False):
    """d_i = (X_i - D(X_i; t_i)) / t_i for i = 0 .. N-2 (or only ``indices``), d_0 = X_0 / sqrt(1 + t_0^2) with ``afs``.

    states: (N, B, *S). Returns (N-1, B, *S) (or (len(indices), B, *S)), and the evaluations spent if ``return_nfe``.
    """
    t = torch.as_tensor(t_steps, dtype=torch.float64).to(states.device)
    N = states.shape[0]
    idx = range(N - 1) if indices is None else [int(i) for i in indices]
    out, nfe = [], 0
    for i in idx:
        x, ti = states[i], t[i].to(states.dtype)
        if afs and i == 0:
            out.append(x / torch.sqrt(1 + ti * ti))
        else:
            out.append((x - denoiser(x, ti, class_labels)) / float(t[i]))
            nfe += 1
    d = torch.stack(out) if out else states[:0]
    return (d, nfe) if return_nfe else d


class _FirstStageRecorder:
    """Wraps a denoiser during a solver run and keeps, for each step i, the first evaluation at sigma == t_i.

    A solver callback advances the step. After the run, a recorded call whose input equals X_i exactly gives d_i with
    no extra evaluation; any step without one is recomputed (e.g. UniPC never evaluates its corrected points).
    """

    def __init__(self, denoiser, t_steps: Sequence[float]):
        self.denoiser = denoiser
        self.ts = list(t_steps)
        self.step = 0
        self.first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x, sigma, class_labels=None):
        out = self.denoiser(x, sigma, class_labels)
        i = self.step
        if i not in self.first and i < len(self.ts):
            s = torch.as_tensor(sigma)
            if s.numel() == 1 and float(s) == self.ts[i]:
                self.first[i] = (x, out)
        return out

    def callback(self, info: StepInfo) -> None:
        self.step = info.i + 1

    def __getattr__(self, name):                       # sigma_min, shape, label_dim, ... of the wrapped denoiser
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def _per_round(class_labels, R: int) -> list:
    if class_labels is None:
        return [None] * R
    if isinstance(class_labels, (list, tuple)):
        if len(class_labels) != R:
            raise ValueError(f"class_labels has {len(class_labels)} rounds, expected {R}")
        return list(class_labels)
    if torch.is_tensor(class_labels) and class_labels.shape[0] == R:
        return [class_labels[r] for r in range(R)]
    raise ValueError("class_labels must be None, a list with one entry per round, or a tensor with a leading round axis")


def _run_teacher_round(denoiser, latents, t_steps, solver: str, afs: bool, denoise_to_zero: bool, class_labels,
                       options: dict):
    """One round: (states (N, B, *S), slopes (N-1, B, *S), final (B, *S), nfe). ``latents`` are unit noise."""
    t = torch.as_tensor(t_steps, dtype=torch.float64)
    x = latents * t[0].to(device=latents.device, dtype=latents.dtype)
    rec = _FirstStageRecorder(denoiser, t.to(latents.dtype).tolist())     # the grid as the solver sees it
    res = solve(solver, rec, x, t, class_labels=class_labels, afs=afs, denoise_to_zero=denoise_to_zero,
                return_trajectory=True, callback=rec.callback, **options)
    traj = res.trajectory
    N = t.shape[0]
    states, final = traj[:N], traj[-1]
    tt = t.to(device=states.device)
    slopes, missing = [None] * (N - 1), []
    for i in range(N - 1):
        if afs and i == 0:
            ti = tt[0].to(states.dtype)
            slopes[0] = states[0] / torch.sqrt(1 + ti * ti)
            continue
        got = rec.first.get(i)
        if got is not None and got[0].shape == states[i].shape and torch.equal(got[0], states[i]):
            slopes[i] = (states[i] - got[1]) / rec.ts[i]
        else:
            missing.append(i)
    nfe = res.nfe
    if missing:
        d, n = first_stage_slopes(denoiser, states, t, afs=afs, class_labels=class_labels, indices=missing,
                                  return_nfe=True)
        for k, i in enumerate(missing):
            slopes[i] = d[k]
        nfe += n
    return states, torch.stack(slopes), final, nfe


def teacher_trajectories(denoiser, latents, t_steps, *, solver: str = "ipndm", afs: bool = False,
                         denoise_to_zero: bool = False, class_labels=None, **options) -> TeacherTrajectories:
    """Run the teacher for each round: ``latents`` (R, B, *S) unit noise (round r starts at latents[r] * t_0).

    The slopes come from the teacher's own evaluations (no extra NFE for euler, heun, dpm2, ipndm, ipndm_v, dpmpp,
    deis); Heun's and DPM-Solver-2's are their Euler-predictor slopes, as the reference's ``return_eps``.
    ``options`` are the teacher solver's own (max_order, ...). Runs under ``torch.no_grad``.
    """
    latents = torch.as_tensor(latents)
    labels = _per_round(class_labels, latents.shape[0])
    S, D, F, nfe = [], [], [], 0
    with torch.no_grad():
        for r in range(latents.shape[0]):
            s, d, f, n = _run_teacher_round(denoiser, latents[r], t_steps, solver, afs, denoise_to_zero, labels[r],
                                            options)
            S.append(s), D.append(d), F.append(f)
            nfe += n
    return TeacherTrajectories(states=torch.stack(S), slopes=torch.stack(D), t_steps=t_steps, final=torch.stack(F),
                               class_labels=labels, nfe=nfe)


# ---------------------------------------------------------------------------------------------------------------
# Cost matrix.

def _flat(x: torch.Tensor, lead: int) -> torch.Tensor:
    return x.reshape(*x.shape[:lead], -1)


def _dev(points: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Distance of points (J, B, *S) from the line through start and end (B, *S), per sample: (J, B).

    As the reference's ``cal_deviation``: v = E - P, u = (E - X_0) / ||E - X_0||, ||v - (v.u) u||.
    """
    P = _flat(points, 2)
    X0, E = _flat(start, 1), _flat(end, 1)
    bc = E - X0
    u = bc / torch.linalg.vector_norm(bc, dim=-1, keepdim=True)
    v = E.unsqueeze(0) - P
    proj = (v * u.unsqueeze(0)).sum(-1, keepdim=True) * u.unsqueeze(0)
    return torch.linalg.vector_norm(v - proj, dim=-1)


def trajectory_deviation(states: torch.Tensor, final: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dev_b of every intermediate point of one trajectory batch: (N', B), as ``cal_deviation`` (transposed).

    states (N, B, *S); with ``final`` (the denoised end point), the trajectory is [X_0 .. X_{N-1}, final] and the
    intermediate points are X_1 .. X_{N-1}; otherwise X_1 .. X_{N-2}.
    """
    full = states if final is None else torch.cat([states, final.unsqueeze(0)])
    return _dev(full[1:-1], full[0], full[-1])


def _round_cost(states, slopes, t_steps, metric: str, final=None):
    """(cost (N, N) float64 with entries i < j, dev_T (N'',) float64) for one round."""
    N = states.shape[0]
    t = torch.as_tensor(t_steps, dtype=torch.float64).to(device=states.device)
    tt = t.to(states.dtype)
    denoised_end = final is not None and not torch.equal(final, states[-1])
    E = states[-1] if final is None else final
    cost = torch.zeros(N, N, dtype=torch.float64, device=states.device)
    dev_T = None
    if metric == "dev":
        dev_T = trajectory_deviation(states, final if denoised_end else None).mean(dim=1).to(torch.float64)
        dev_pad = torch.cat([dev_T, dev_T.new_zeros(1)])       # dev_T(j) at index j-1; dev_T(N-1) = 0 (no d2z)
    for i in range(N - 1):
        h = (tt[i + 1:] - tt[i]).reshape(-1, *([1] * (states.ndim - 1)))
        Y = states[i].unsqueeze(0) + h * slopes[i].unsqueeze(0)          # (N-1-i, B, *S): Y_ij, j = i+1 .. N-1
        if metric == "l2":
            c = torch.linalg.vector_norm(_flat(Y - states[i + 1:], 2), ord=2, dim=-1).mean(dim=1)
        elif metric == "l1":
            c = torch.linalg.vector_norm(_flat(Y - states[i + 1:], 2), ord=1, dim=-1).mean(dim=1)
        else:
            c = _dev(Y, states[0], E).mean(dim=1) - dev_pad[i:N - 1]
        cost[i, i + 1:] = c.to(torch.float64)
    return cost, dev_T


@dataclass
class CostMatrix:
    """cost = cost_sum / R (entries i < j; the rest 0); teacher_dev (R, N'') dev_T per round (dev only, else None)."""

    cost: torch.Tensor
    cost_sum: torch.Tensor
    teacher_dev: Optional[torch.Tensor]
    rounds: int


def cost_matrix(trajectories, slopes, t_steps, metric: str = "dev", *, finals=None) -> CostMatrix:
    """The GITS cost matrix from teacher trajectories (no denoiser needed).

    trajectories: (R, N, B, *S) or an iterable of R (N, B, *S) tensors; slopes likewise (R, N-1, B, *S);
    finals: optional per-round end points E (R, B, *S) (a teacher that denoised to zero); t_steps: (N,).
    Costs are summed over rounds in order, then divided by R (the reference's all_reduce / world size 1).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    finals_it = iter(finals) if finals is not None else None
    cost_sum, devs, R = None, [], 0
    for X, d in zip(trajectories, slopes):
        E = next(finals_it) if finals_it is not None else None
        c, dev_T = _round_cost(X, d, t_steps, metric, E)
        cost_sum = c if cost_sum is None else cost_sum + c
        if dev_T is not None:
            devs.append(dev_T)
        R += 1
    if R == 0:
        raise ValueError("no trajectories given")
    return CostMatrix(cost=cost_sum / R, cost_sum=cost_sum, teacher_dev=torch.stack(devs) if devs else None, rounds=R)


# ---------------------------------------------------------------------------------------------------------------
# Dynamic programming.

def gits_dp(cost, num_steps: int, coeff: float = 1.15) -> list[int]:
    """The reference's DP (``gits_utils.dp``): M = ``num_steps`` indices into the teacher grid, from 0 to N-1.

    K = M - 1. V[i][1] = cost[i][N-1]; V[j][k] = min over j < i <= N-2 of cost[j][i] + coeff V[i][k-1]. Backtracking
    from w = 0 takes, for k = K .. 2, the first (smallest) j > w with V[w][k] == cost[w][j] + coeff V[j][k-1] exactly
    (so ties go to the smallest index); then appends N-1. float64 arithmetic in the reference's order.
    """
    C = np.asarray(torch.as_tensor(cost).detach().cpu().to(torch.float64).numpy() if torch.is_tensor(cost) else cost,
                   dtype=np.float64)
    N = C.shape[0]
    if C.ndim != 2 or C.shape[1] != N:
        raise ValueError(f"cost must be square (N, N), got {C.shape}")
    if not (isinstance(num_steps, (int, np.integer)) and 2 <= num_steps <= N):
        raise ValueError(f"num_steps must be an integer in [2, N={N}], got {num_steps!r}")
    if not (math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"coeff must be positive and finite, got {coeff!r}")
    if not np.all(np.isfinite(C[np.triu_indices(N, 1)])):
        raise ValueError("cost has non-finite entries above the diagonal")
    K = num_steps - 1
    V = np.full((N, K + 1), np.inf)
    V[:, 1] = C[:, -1]
    for k in range(2, K + 1):
        for j in range(N - 1):
            if j + 1 < N - 1:
                cand = C[j, j + 1:N - 1] + coeff * V[j + 1:N - 1, k - 1]
                V[j, k] = min(np.inf, float(cand.min()))
    phi, w = [0], 0
    for k in range(K, 0, -1):
        cand = C[w, w + 1:] + coeff * V[w + 1:, k - 1]
        hit = np.flatnonzero(cand == V[w, k])
        if hit.size:
            w = w + 1 + int(hit[0])
            phi.append(w)
    phi.append(N - 1)
    return phi


def dp_objective(cost, indices: Sequence[int], coeff: float = 1.15) -> float:
    """sum_m coeff^m cost[i_m][i_{m+1}] over consecutive indices (what :func:`gits_dp` minimises)."""
    C = torch.as_tensor(cost, dtype=torch.float64)
    total = 0.0
    for m, (a, b) in enumerate(zip(indices[:-1], indices[1:])):
        total += coeff ** m * float(C[a, b])
    return total


# ---------------------------------------------------------------------------------------------------------------
# Free-step (AFS) search.

def free_step_search(denoiser, starts, targets, t_steps_tea, phi: Sequence[int], solver: str, *, class_labels=None,
                     denoise_to_zero: bool = False, dist_init: float = 999999.0, **options):
    """Try k = 1 .. phi[1]-1: the student with AFS on t_tea[[0, k] + phi[1:]] from each start.

    starts: (B, *S) states at t_tea[0] (or a list of them, one per round); targets: the teacher's end points, same
    layout; class_labels: matching (or a list). dist_k = mean over the given rounds of mean_b ||x_final - target||_2.
    The winner is the strict minimum starting from ``dist_init`` (ties: smallest k).
    Returns (dp_list, candidates, dists, nfe).
    """
    starts = list(starts) if isinstance(starts, (list, tuple)) else [starts]
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    labels = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels] * len(starts)
    if not (len(starts) == len(targets) == len(labels)):
        raise ValueError("starts, targets and class_labels must have one entry per round")
    t = torch.as_tensor(t_steps_tea, dtype=torch.float64)
    phi = [int(i) for i in phi]
    best, dp_list = dist_init, list(phi)
    candidates, dists, nfe = list(range(1, phi[1])), [], 0
    with torch.no_grad():
        for k in candidates:
            idx = [0, k] + phi[1:]
            total = 0.0
            for x0, target, cl in zip(starts, targets, labels):
                res = solve(solver, denoiser, x0, t[idx], class_labels=cl, afs=True,
                            denoise_to_zero=denoise_to_zero, **options)
                nfe += res.nfe
                total += float(torch.linalg.vector_norm(_flat(res.x - target, 1), ord=2, dim=-1).mean())
            dist = total / len(starts)
            dists.append(dist)
            if dist < best:
                best, dp_list = dist, idx
    return dp_list, candidates, dists, nfe


# ---------------------------------------------------------------------------------------------------------------
# Everything together.

@dataclass
class GITSResult:
    """The selected schedule and the diagnostics the golden cases record.

    dp_list: indices into t_steps_tea the student runs on (M, or M+1 after a free step); t_steps = t_steps_tea[dp_list];
    dp_phi: the DP's M indices; cost_matrix / cost_matrix_sum (N, N); teacher_dev (R, N-2) (dev only);
    teacher_final (R, B, *S); afs_candidates: the k the free-step search considers, 1 .. phi[1]-1 (listed even when
    no search runs, as the golden cases do); afs_dist: their distances (empty without a search); free_step: k* or None;
    nfe_teacher: teacher calls (all rounds); nfe_search: teacher plus search calls (the reference's get_dp_list).
    """

    dp_list: list[int]
    t_steps: torch.Tensor
    dp_phi: list[int]
    t_steps_tea: torch.Tensor
    cost_matrix: torch.Tensor
    cost_matrix_sum: torch.Tensor
    teacher_dev: Optional[torch.Tensor]
    teacher_final: torch.Tensor
    afs_candidates: list[int] = field(default_factory=list)
    afs_dist: list[float] = field(default_factory=list)
    free_step: Optional[int] = None
    warmup_rounds: int = 1
    nfe_teacher: int = 0
    nfe_search: int = 0
    metric: str = "dev"
    coeff: float = 1.15
    num_steps: int = 0

    def sigmas(self, append_zero: bool = True) -> list[float]:
        """The schedule for diffusers / k-diffusion (see :func:`schedule_to_sigmas`)."""
        return schedule_to_sigmas(self.t_steps, append_zero=append_zero)


def _inherit(teacher: str, student_options: dict) -> dict:
    allowed = set(solver_options(teacher)) - set(_RESERVED)
    return {k: v for k, v in student_options.items() if k in allowed}


def gits_schedule(denoiser, t_steps_tea, num_steps: int, *, solver: str = "ipndm", solver_options: dict | None = None,
                  teacher_solver: str = "ipndm", teacher_options: dict | None = None, metric: str = "dev",
                  coeff: float = 1.15, afs: bool = False, denoise_to_zero: bool = False,
                  warmup_noise: torch.Tensor | None = None, num_warmup: int = 256, max_batch_size: int = 64,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None, class_labels=None,
                  teacher: TeacherTrajectories | None = None, teacher_afs: bool | None = None,
                  search_on: str = "last", dist_init: float = 999999.0, exact_rounds: bool = False) -> GITSResult:
    """GITS as the reference's ``get_dp_list``: warm-up teacher, cost matrix, DP, free-step search (afs only).

    denoiser: EDM-form ``D(x, sigma, class_labels)``; t_steps_tea: the fine grid (N,); num_steps: M, the student's
    number of time points; solver / solver_options: the student (our names; the reference's ``dpm`` is accepted) and
    its own options (max_order, predict_x0, r, ...; not afs/denoise_to_zero, which are arguments here).
    teacher_options: None inherits the student's options that the teacher accepts (the reference).
    Warm-up latents: ``warmup_noise`` (R, B, *S), or R = :func:`warmup_rounds` (num_warmup, max_batch_size) rounds of
    ``torch.randn`` (B = max_batch_size, shape ``denoiser.shape``) from ``generator``. ``teacher``: precomputed
    trajectories (e.g. :meth:`TeacherTrajectories.from_states` on stored ones) instead of running the teacher.
    teacher_afs: None = ``afs`` (the reference; see the module docstring), False = an accurate teacher.
    search_on: "last" (the reference) or "all" rounds for the free-step distance.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if search_on not in ("last", "all"):
        raise ValueError(f"search_on must be 'last' or 'all', got {search_on!r}")
    solver_options = dict(solver_options or {})
    bad = sorted(set(solver_options) & set(_RESERVED))
    if bad:
        raise ValueError(f"solver_options may not set {bad}; pass afs / denoise_to_zero / class_labels to gits_schedule")
    t_tea = torch.as_tensor(t_steps_tea, dtype=torch.float64).reshape(-1)
    N = t_tea.shape[0]
    if not (isinstance(num_steps, (int, np.integer)) and 2 <= num_steps <= N):
        raise ValueError(f"num_steps must be an integer in [2, N={N}], got {num_steps!r}")
    t_afs = afs if teacher_afs is None else bool(teacher_afs)
    t_opts = _inherit(teacher_solver, solver_options) if teacher_options is None else dict(teacher_options)

    # Warm-up latents.
    if teacher is None:
        if warmup_noise is None:
            R = warmup_rounds(num_warmup, max_batch_size, exact=exact_rounds)
            shape = tuple(denoiser.shape)
            warmup_noise = torch.stack([torch.randn((max_batch_size, *shape), generator=generator, dtype=dtype)
                                        for _ in range(R)])
        warmup_noise = torch.as_tensor(warmup_noise)
        if device is not None:
            warmup_noise = warmup_noise.to(device)
        R = int(warmup_noise.shape[0])
    else:
        R = teacher.rounds
        if not torch.equal(teacher.t_steps.cpu(), t_tea):
            raise ValueError("teacher.t_steps differs from t_steps_tea")
    labels = _per_round(class_labels if teacher is None else teacher.class_labels, R)

    # Teacher rounds -> cost (one round in memory at a time unless search_on="all").
    cost_sum, devs, finals, kept, nfe_teacher = None, [], [], [], 0
    with torch.no_grad():
        for r in range(R):
            if teacher is None:
                X, d, E, n = _run_teacher_round(denoiser, warmup_noise[r], t_tea, teacher_solver, t_afs,
                                                denoise_to_zero, labels[r], t_opts)
            else:
                X, d, E, n = teacher.states[r], teacher.slopes[r], teacher.final[r], 0
            nfe_teacher += n
            c, dev_T = _round_cost(X, d, t_tea, metric, E)
            cost_sum = c if cost_sum is None else cost_sum + c
            if dev_T is not None:
                devs.append(dev_T)
            finals.append(E)
            if search_on == "all" or r == R - 1:
                kept.append((X[0], E, labels[r]))
    if teacher is not None:
        nfe_teacher = teacher.nfe
    cost = cost_sum / R
    phi = gits_dp(cost, int(num_steps), coeff)

    candidates = list(range(1, phi[1]))
    dists: list[float] = []
    dp_list, free_step, nfe_free = list(phi), None, 0
    if afs:
        dp_list, candidates, dists, nfe_free = free_step_search(
            denoiser, [s for s, _, _ in kept], [e for _, e, _ in kept], t_tea, phi, solver,
            class_labels=[c for _, _, c in kept], denoise_to_zero=denoise_to_zero, dist_init=dist_init,
            **solver_options)
        if len(dp_list) > len(phi):
            free_step = dp_list[1]
    return GITSResult(
        dp_list=dp_list, t_steps=t_tea[dp_list], dp_phi=phi, t_steps_tea=t_tea, cost_matrix=cost,
        cost_matrix_sum=cost_sum, teacher_dev=torch.stack(devs) if devs else None, teacher_final=torch.stack(finals),
        afs_candidates=candidates, afs_dist=dists, free_step=free_step, warmup_rounds=R, nfe_teacher=nfe_teacher,
        nfe_search=nfe_teacher + nfe_free, metric=metric, coeff=float(coeff), num_steps=int(num_steps))
