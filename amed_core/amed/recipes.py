"""The recipes in one place: what ``amed train`` (``--preset``), sweeps and ``SamplerSpec.create(recipe=...)`` fill
in for what the caller leaves unset, per AMED solver.

- ``"reference"``: the reference implementation's (arXiv 2312.00094, its launch.sh): the method table's default
  schedule and options (``afs_in_history=True``), ``scale_dir=0.01``, ``scale_time=0.2`` for the iPNDM plugin and 0
  otherwise; ``TrainConfig.reference()``. The Python API's default (``SamplerSpec.create``, ``TrainConfig()``).
- ``"improved"``: ours (BENCHMARKS.md "AMED quality"): as above, but the multistep plugins keep the AFS estimate
  out of their history (``afs_in_history=False``); ``TrainConfig.improved(solver)``. ``amed train``'s default.

The training recipe of each: ``amed_core.amed.train.train_config(solver, recipe)``. Both take the schedule family from the method table (AMED-Solver: time-uniform rho=1; plugins: their base solver's)
over the denoiser's own sigma range.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..methods import get_method, method_names
from ..schedules import ScheduleSpec

__all__ = ["RECIPES", "sampler_defaults", "default_schedule_for", "check_recipe"]

RECIPES = ("reference", "improved")


def check_recipe(solver: str, recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if solver not in method_names("amed"):
        raise ValueError(f"solver must be one of {sorted(method_names('amed'))}, got {solver!r}")


def default_schedule_for(solver: str, denoiser=None) -> ScheduleSpec:
    """The method table's schedule for ``solver``, over ``denoiser``'s sigma range when one is given."""
    schedule = get_method(solver).default_schedule
    if denoiser is not None:
        schedule = replace(schedule, sigma_min=float(denoiser.sigma_min), sigma_max=float(denoiser.sigma_max))
    return schedule


def sampler_defaults(solver: str, recipe: str = "reference") -> dict[str, Any]:
    """``{"scale_dir", "scale_time", "afs_in_history"}`` of ``recipe`` for ``solver`` (``afs_in_history`` None where
    the solver has no multistep history)."""
    check_recipe(solver, recipe)
    improved = recipe == "improved"
    has_history = "afs_in_history" in get_method(solver).options
    return {"scale_dir": 0.01, "scale_time": 0.2 if solver == "amed+ipndm" else 0.0,
            "afs_in_history": (not improved) if has_history else None}
