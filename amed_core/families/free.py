"""Family ``free``: a training-free solver with a schedule and options; no teacher, no weights (JSON only)."""

from __future__ import annotations

from typing import Any, Mapping

from .static import SPEC_FILE, StaticSampler, StaticSpec
from .static import describe as _describe
from .static import from_files as _from_files
from .static import schedule as _schedule

name = "free"
needs_teacher = False
trains = False
teacher_grid = None
files = (SPEC_FILE,)


def make(solver: str, nfe: int, *, schedule=None, afs: bool | None = None, options: Mapping[str, Any] | None = None,
         denoiser=None, teacher: Mapping | None = None) -> StaticSampler:
    """The free sampler ``solver`` at ``nfe``: N from the method table, sigmas = ``schedule.grid(N)`` (default: the
    solver's default schedule on the denoiser's sigma range); ``afs=None`` = where the NFE needs it."""
    from ..methods import get_method, num_steps_for, pick_afs
    from ..schedules import ScheduleSpec

    m = get_method(solver)
    if m.family != "free":
        raise ValueError(f"{solver!r} is not a training-free solver (family {m.family!r})")
    opts = dict(options or {})
    use_afs = pick_afs(solver, nfe, afs)
    n = num_steps_for(solver, nfe, use_afs, opts)
    if schedule is None:
        schedule = m.default_schedule
    if isinstance(schedule, Mapping):
        schedule = ScheduleSpec.from_dict(dict(schedule))
    if denoiser is not None and (schedule.sigma_min is None or schedule.sigma_max is None):
        from dataclasses import replace

        schedule = replace(schedule, sigma_min=schedule.sigma_min or float(denoiser.sigma_min),
                           sigma_max=schedule.sigma_max or float(denoiser.sigma_max))
    sigmas = [float(v) for v in schedule.grid(n)]
    ident = dict(teacher or (denoiser.identity() if denoiser is not None and hasattr(denoiser, "identity") else {}))
    return StaticSampler(StaticSpec("free", solver, solver, int(nfe), tuple(sigmas), use_afs, opts,
                                    schedule.to_dict(), ident))


def from_files(files: Mapping[str, bytes]) -> StaticSampler:
    return _from_files(files, "free")


def to_files(sampler: StaticSampler) -> dict[str, bytes]:
    return sampler.files()


def describe(sampler: StaticSampler) -> dict:
    return _describe(sampler)


def schedule(sampler: StaticSampler):
    """A pure schedule: its sigmas and base solver (:class:`~amed_core.families.static.PureSchedule`), for the
    exports of :mod:`amed_core.integrations`."""
    return _schedule(sampler)


PANEL_SCHEDULES = (("polynomial", 7.0), ("logsnr", 1.0), ("time_uniform", 1.0))


def option_sets(solver: str, nfe: int, *, schedules=PANEL_SCHEDULES, afs=(False, True), thresholding=(False, True)):
    """The training-free panel of one solver at ``nfe``: every (schedule, AFS, options) that spends exactly ``nfe``
    (AFS on/off where reachable; schedules polynomial rho 7 / logSNR / time-uniform; dynamic thresholding on/off for
    the data-prediction solvers, dpmpp and unipc). Yields dicts {solver, schedule (ScheduleSpec), afs, options}."""
    from ..methods import get_method, num_steps_for
    from ..schedules import ScheduleSpec

    m = get_method(solver)
    if m.family != "free":
        raise ValueError(f"{solver!r} is not a training-free solver")
    dts = thresholding if "dynamic_thresholding" in m.options else (None,)
    for stype, rho in schedules:
        for a in afs:
            for dt in dts:
                opts = dict(m.default_options)
                if dt is not None:
                    opts["dynamic_thresholding"] = bool(dt)
                try:
                    num_steps_for(solver, nfe, a, opts)
                except ValueError:
                    continue
                yield {"solver": solver, "schedule": ScheduleSpec(stype, rho=rho), "afs": bool(a), "options": opts}
