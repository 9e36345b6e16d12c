"""Family ``gits``: a base solver on a GITS schedule (Chen et al., ICML 2024) selected by DP from the stored
teacher's fine grid (:mod:`amed_core.methods.gits`); no weights, the checkpoint is JSON (the explicit sigma list).

Fitting reads stored teacher trajectories at every point of the teacher's grid (``teacher_grid = "fine"``; in a sweep
that grid is ``refine(union of the student grids, M)``, so GITS selects among those points), recomputes the first-stage
slopes on a warm-up subset (default 256 trajectories: N_fine - 1 denoiser calls each), builds the cost matrix and
runs the DP. GITS can only pick points the teacher visited: with a coarse stored grid the choice is coarse too.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .static import SPEC_FILE, StaticSampler, StaticSpec
from .static import describe as _describe
from .static import from_files as _from_files
from .static import schedule as _schedule

name = "gits"
needs_teacher = True
trains = False
teacher_grid = "fine"
files = (SPEC_FILE,)


def base_of(method: str) -> str:
    """``gits+ipndm`` -> ``ipndm`` (a bare free solver name is accepted)."""
    from ..methods import get_method

    m = get_method(method)
    if m.family == "gits":
        return str(m.base)
    if m.family == "free":
        return method
    raise ValueError(f"{method!r} is neither a GITS method nor a training-free solver")


def fit(denoiser, states: torch.Tensor, sigmas_fine, *, method: str, nfe: int, afs: bool = False,
        options: Mapping[str, Any] | None = None, metric: str = "dev", coeff: float = 1.15, class_labels=None,
        warmup: int | None = 256, teacher: Mapping | None = None, dtype: torch.dtype = torch.float64,
        keep=None, keep_afs: bool | None = None, validation=None) -> StaticSampler:
    """A GITS sampler for ``method`` (``gits+ipndm`` or ``ipndm``) at ``nfe`` from stored trajectories.

    states: (G, B, C, H, W) teacher states at ``sigmas_fine`` (G,) (a TeacherShard's ``states`` / ``sigmas``);
    the first ``warmup`` trajectories are used (None: all). class_labels: (B, label_dim) one-hot or None.
    AFS (``afs=True``) runs the reference's free-step search; the resulting grid must spend ``nfe`` (ValueError if
    the search changed the count).

    ``keep`` (ours, issue 21): a schedule to keep unless the selected one is better, e.g. the training-free panel
    winner's (the same solver and options, its own AFS ``keep_afs``, default ``afs``; its points should be on the fine
    grid so the DP could pick them). Both are scored on ``validation`` (held-out trajectories, :class:`amed_core.validation.ValidationSet`;
    default: the warm-up trajectories' own final states) and the better one is returned; ``fit`` records both."""
    from ..methods import gits as G
    from ..methods import nfe_for, num_steps_for

    solver = base_of(method)
    opts = dict(options or {})
    M = num_steps_for(solver, nfe, afs, opts)
    s = torch.as_tensor(states)
    if warmup is not None:
        s = s[:, :warmup]
    labels = None
    if class_labels is not None:
        labels = [torch.as_tensor(class_labels)[: s.shape[1]].to(dtype)]
    s = s.to(dtype)
    t = torch.as_tensor(sigmas_fine, dtype=torch.float64)
    if M > t.shape[0]:
        raise ValueError(f"GITS needs at least {M} teacher grid points for {solver} at NFE {nfe}; the stored grid has "
                         f"{t.shape[0]} (plan a finer teacher grid)")
    traj = G.TeacherTrajectories.from_states(denoiser, s[None], t, afs=False, class_labels=labels)
    res = G.gits_schedule(denoiser, t, M, solver=solver, solver_options=opts, metric=metric, coeff=coeff, afs=afs,
                          teacher=traj, teacher_afs=False)
    sigmas = [float(v) for v in res.t_steps]
    spent = nfe_for(solver, len(sigmas), afs, opts)
    if spent != nfe:
        raise ValueError(f"GITS with afs={afs} selected {len(sigmas)} points, which spend {spent} evaluations, not {nfe}")
    ident = dict(teacher or (denoiser.identity() if hasattr(denoiser, "identity") else {}))
    fit_info = {"metric": metric, "coeff": float(coeff), "dp_list": [int(i) for i in res.dp_list],
                "teacher_grid_points": int(t.shape[0]), "warmup_trajectories": int(s.shape[1]),
                "slope_evals": int(traj.nfe), "free_step": res.free_step}
    if keep is not None:
        from ..methods import solve
        from ..validation import ValidationSet

        keep = [float(v) for v in keep]
        k_afs = afs if keep_afs is None else bool(keep_afs)
        if nfe_for(solver, len(keep), k_afs, opts) != nfe:
            raise ValueError(f"keep: {solver} on its {len(keep)} points (afs={k_afs}) does not spend {nfe} evaluations")
        vset = validation or ValidationSet(s[0] / t[0].to(s.dtype), s[-1], None if labels is None else labels[0])

        def score(sig, a):
            grid = torch.tensor(sig, dtype=torch.float64)
            return vset.score(lambda n, lab: solve(solver, denoiser, n * grid[0].to(n.dtype), grid, class_labels=lab,
                                                   afs=a, **opts).x)

        selected, kept = score(sigmas, afs), score(keep, k_afs)
        fit_info.update(selected_score=selected, kept_score=kept, kept=bool(kept <= selected),
                        validation_trajectories=len(vset))
        if kept <= selected:
            sigmas, afs = keep, k_afs
    return StaticSampler(StaticSpec("gits", solver, f"gits+{solver}", int(nfe), tuple(sigmas), bool(afs), opts, None,
                                    ident, fit_info))


def from_files(files: Mapping[str, bytes]) -> StaticSampler:
    return _from_files(files, "gits")


def to_files(sampler: StaticSampler) -> dict[str, bytes]:
    return sampler.files()


def describe(sampler: StaticSampler) -> dict:
    return _describe(sampler)


def schedule(sampler: StaticSampler):
    """A pure schedule: its sigmas and base solver (:class:`~amed_core.families.static.PureSchedule`), for the
    exports of :mod:`amed_core.integrations`."""
    return _schedule(sampler)
