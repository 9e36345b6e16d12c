"""Pieces of a plan shared by the AMED students (flows.plan.sweep) and the other families (flows.plan.families):
the schedule on a teacher's sigma range, the fields every evaluate job shares, the teacher identity a free
sampler records, the students' teacher job at given grids."""

from __future__ import annotations

from typing import Any

from flows.config import DatasetConfig, SweepConfig
from flows.plan.jobs import ScoreSettings, TeacherJob
from flows.results import EvalProtocol

__all__ = ["identity", "schedule_for", "eval_common", "thresholding", "students_teacher"]


def identity(teacher: TeacherJob) -> dict[str, Any]:
    """The model's ``identity()`` as the teacher's spec records it (``TeacherSpec.model``): what a training-free
    checkpoint of this teacher names as its model. (It read a ``teacher`` key the spec does not have, so every
    training-free checkpoint recorded ``{}`` and ``amed fetch`` printed "teacher unknown", issue 19.)"""
    import json

    return dict(json.loads(teacher.spec_json).get("model") or {})


def schedule_for(cfg: SweepConfig, den, schedule_type: str, rho: float):
    from amed_core.schedules import ScheduleSpec

    sc = cfg.sampler
    return ScheduleSpec(schedule_type=schedule_type, rho=rho, sigma_min=sc.sigma_min or float(den.sigma_min),
                        sigma_max=sc.sigma_max or float(den.sigma_max))


def thresholding(solver: str, options: dict, den) -> dict:
    """``options`` with dynamic thresholding chosen from the teacher's data range where the solver takes it and the
    sweep did not set it: on only for data inside [-1, 1] (amed_core.data_range; ``den`` is the probe's facts)."""
    from amed_core.data_range import thresholding_options

    return thresholding_options(solver, options, getattr(den, "data_range", None),
                                getattr(den, "data_range_how", "declared"))


def eval_common(cfg: SweepConfig, teacher: TeacherJob, sp, proto: EvalProtocol) -> dict[str, Any]:
    ev = cfg.evaluation
    settings = ScoreSettings(metric=ev.metric, num_samples=ev.num_samples, seed=ev.seed, batch_size=ev.batch_size,
                             reference_steps=ev.reference_steps,
                             **({"fid_stats": ev.fid_stats, "inception_weights": ev.inception_weights}
                                if ev.metric == "fid" else {}))
    return {"store_url": teacher.store_url, "storage_options": teacher.storage_options,
            "torch_threads": cfg.compute.torch_threads, "dataset": teacher.dataset, "protocol": settings,
            "protocol_hash": proto.hash, "grid_samples": ev.grid_samples, "reference_spec": teacher.reference_spec,
            "schedule": sp.schedule.to_dict()}


def students_teacher(cfg: SweepConfig, d: DatasetConfig, ds: DatasetConfig, den, grids, store_url: str) -> TeacherJob:
    """The TeacherJob storing trajectories at the union of ``grids`` (StudentGrids) for dataset ``d``."""
    from amed_core.teacher import TeacherSpec

    t = cfg.teacher
    tspec = TeacherSpec.for_denoiser(den, grids, num_trajectories=t.num_trajectories, shard_size=t.shard_size,
                                     sub_steps=t.M, solver=t.solver, dtype=t.dtype, base_seed=t.seed,
                                     solver_options=thresholding(t.solver, {}, den))
    return TeacherJob(name=d.name, dataset=ds, spec_json=tspec.to_json(), spec_hash=tspec.spec_hash,
                      num_shards=tspec.num_shards, num_trajectories=t.num_trajectories, store_url=store_url,
                      storage_options=dict(cfg.storage_options))
