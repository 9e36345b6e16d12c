"""Family ``free``: a training-free solver with a schedule and options; no teacher, no weights (JSON only)."""

from __future__ import annotations

from typing import Any, Mapping

from .static import SPEC_FILE, StaticSampler, StaticSpec
from .static import describe as _describe
from .static import from_files as _from_files

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
