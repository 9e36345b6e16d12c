"""Planning the candidates beyond AMED's students: the training-free panel at every (dataset, NFE), GITS (a base
solver on a schedule chosen from a small teacher on a fine grid), EPD (parallel directions trained on the
students' teacher) and GS (the generalized solver, trained on the final samples of an endpoint-only teacher)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from flows.config import DatasetConfig, PanelEntry, SweepConfig
from flows.plan.common import eval_common, identity, schedule_for, thresholding
from flows.plan.jobs import Candidate, EvalJob, ScoreSettings, TeacherJob, TrainJob, slug
from flows.results import EvalProtocol
from flows.storage.checksums import json_digest

__all__ = ["panel_job", "plan_panel", "plan_gits_teacher", "plan_gits_candidate", "epd_spec", "plan_epd_candidate",
           "plan_gs_teacher", "gs_base_job", "plan_gs_candidate"]


def panel_job(cfg: SweepConfig, teacher: TeacherJob, den, entry, nfe: int, proto: EvalProtocol,
              reference: str) -> Optional[EvalJob]:
    """The evaluate job of one panel entry at ``nfe`` (None where the solver cannot spend exactly ``nfe``). Its id and
    score key use plan_baseline's hash, so an entry equal to a candidate's base solver is evaluated once."""
    from amed_core.methods import get_method, num_steps_for, pick_afs

    m = get_method(entry.solver)
    default = m.default_schedule
    schedule = schedule_for(cfg, den, entry.schedule_type or default.schedule_type,
                             entry.schedule_rho if entry.schedule_rho is not None else
                             (default.rho if entry.schedule_type in (None, default.schedule_type) else 7.0))
    afs = pick_afs(entry.solver, nfe, None if entry.afs == "auto" else entry.afs)
    opts = {**thresholding(entry.solver, {**dict(m.default_options), **dict(entry.options)}, den), "afs": afs}
    try:
        steps = num_steps_for(entry.solver, nfe, afs, opts)
    except ValueError:
        return None
    if entry.schedule_type == "discrete" or (entry.options and set(entry.options) - m.options):
        raise ValueError(f"panel: {entry.solver} takes options {sorted(m.options)} and a continuous schedule")
    name, solver = teacher.name, entry.solver
    bid = json_digest({"reference": reference, "solver": solver, "steps": steps, "schedule": schedule.to_dict(),
                       "options": opts, "protocol": proto.hash})
    ev = cfg.evaluation
    settings = ScoreSettings(metric=ev.metric, num_samples=ev.num_samples, seed=ev.seed, batch_size=ev.batch_size,
                             reference_steps=ev.reference_steps,
                             **({"fid_stats": ev.fid_stats, "inception_weights": ev.inception_weights}
                                if ev.metric == "fid" else {}))
    return EvalJob(id=f"base-{slug(name)}-{solver}-nfe{nfe}-{bid[:8]}", store_url=teacher.store_url,
                   storage_options=teacher.storage_options, torch_threads=cfg.compute.torch_threads,
                   dataset=teacher.dataset, kind="baseline", protocol=settings, protocol_hash=proto.hash,
                   grid_samples=ev.grid_samples, reference_spec=teacher.reference_spec, schedule=schedule.to_dict(),
                   result_key=f"evals/{bid}.json", grid_key=f"evals/{bid}-samples.png",
                   title=f"{name} {solver} NFE {nfe}", solver=solver, nfe=nfe, num_steps=steps, solver_options=opts,
                   tags=[f"dataset:{name}", f"solver:{solver}", f"nfe:{nfe}", "baseline", "panel"], family="free",
                   checkpoint=f"checkpoints/free-{slug(name)}-{solver}-nfe{nfe}-{bid[:12]}",
                   teacher_identity=identity(teacher) or dict(den.identity()))  # a panel start: no spec yet


def plan_panel(cfg: SweepConfig, teacher: TeacherJob, den, nfe: int, proto: EvalProtocol, reference: str) -> list[EvalJob]:
    """The configured panel entries at ``nfe`` (unreachable combinations skipped)."""
    from amed_core.families.free import option_sets

    entries = list(cfg.panel.entries)
    for solver in cfg.panel.expand:  # every option set that reaches this NFE
        entries += [PanelEntry(solver=solver, schedule_type=o["schedule"].schedule_type, schedule_rho=o["schedule"].rho,
                               afs=o["afs"], options={k: v for k, v in o["options"].items()})
                    for o in option_sets(solver, nfe)]
    jobs = (panel_job(cfg, teacher, den, e, nfe, proto, reference) for e in entries)
    return [j for j in jobs if j is not None]


def plan_gits_teacher(cfg: SweepConfig, d: DatasetConfig, students: TeacherJob, den, store_url: str,
                      extra_grids=()) -> TeacherJob:
    """A small teacher on the fine grid GITS selects from: ``families.gits.warmup`` trajectories at
    ``grid_points`` points (the students' teacher keeps only the union of the student grids, too coarse to select
    from; its spec stays unchanged, so AMED's trajectories do not move). ``extra_grids``: StudentGrids whose points
    join the fine grid (the panel winners', issue 21)."""
    from amed_core.teacher import StudentGrid, TeacherSpec

    g, t = cfg.families.gits, cfg.teacher
    schedule = schedule_for(cfg, den, g.schedule_type, g.schedule_rho)
    n = g.warmup
    spec = TeacherSpec.for_denoiser(den, [StudentGrid(schedule, g.grid_points), *extra_grids], num_trajectories=n,
                                    shard_size=n, sub_steps=g.sub_steps, solver=t.solver, dtype=t.dtype,
                                    base_seed=t.seed)
    return TeacherJob(name=d.name, role="gits", dataset=students.dataset, spec_json=spec.to_json(),
                      spec_hash=spec.spec_hash, num_shards=spec.num_shards, num_trajectories=n,
                      store_url=store_url, storage_options=dict(cfg.storage_options),
                      reference_spec=students.reference_spec)


def plan_gits_candidate(cfg: SweepConfig, gt: TeacherJob, den, base: str, nfe: int, proto: EvalProtocol,
                        reference: str, tid: str, *, start: Optional[EvalJob] = None, validation: Optional[dict] = None):
    """(Candidate, its base solver's panel job) of ``gits+<base>`` at ``nfe``, or None where ``base`` cannot spend
    exactly ``nfe`` without AFS. The fit reads the GITS teacher ``gt``; the checkpoint is a sampler.json.

    ``start`` (issue 21): the panel's winning entry: GITS runs its solver with its options and AFS, keeps its grid
    unless the DP's is better on held-out trajectories (``validation``: {"teacher": the students' teacher hash,
    "held_out": its last trajectories}, whose final states are accurate; the GITS teacher's, one sub-step on a
    coarse grid, are not), and is compared with it."""
    from amed_core.methods import get_method, num_steps_for

    g = cfg.families.gits
    afs, keep = False, None
    opts = thresholding(base, {**dict(get_method(base).default_options), **dict(g.options.get(base, {}))}, den)
    if start is not None:
        from amed_core.schedules import ScheduleSpec

        opts = {k: v for k, v in start.solver_options.items() if k != "afs"}  # the DP runs without AFS (its free-step
        keep = [float(v) for v in ScheduleSpec.from_dict(start.schedule).grid(start.num_steps)]  # search moves the NFE)
    try:
        num_steps_for(base, nfe, afs, opts)
    except ValueError:
        return None
    base_job = start or panel_job(cfg, gt, den, PanelEntry(solver=base, options=dict(g.options.get(base, {}))), nfe,
                                  proto, reference)
    method, dname = f"gits+{base}", gt.name
    fit = {"metric": g.metric, "coeff": g.coeff, "warmup": g.warmup, "options": opts, "afs": afs}
    if keep is not None:
        fit.update(keep=keep, keep_afs=bool(start.solver_options.get("afs", False)))
    if validation:
        fit["validation"] = dict(validation)
    cid = json_digest({"teacher": gt.spec_hash, "method": method, "nfe": nfe, "fit": fit})
    name = f"{slug(dname)}-{slug(method)}-nfe{nfe}"
    ckpt = f"checkpoints/{name}-{cid[:12]}"
    job = TrainJob(id=f"{name}-{cid[:8]}", name=name, store_url=gt.store_url, storage_options=gt.storage_options,
                   torch_threads=cfg.compute.torch_threads, dataset=gt.dataset, solver=method, nfe=nfe, seed=0,
                   sampler_spec={}, train={"num_trajectories": g.warmup, "batch_size": g.warmup}, epochs=1,
                   teacher_hash=gt.spec_hash, checkpoint=ckpt, family="gits", fit=fit,
                   tags=[f"dataset:{dname}", f"solver:{method}", f"nfe:{nfe}", "family:gits"])
    ev = candidate_eval(base_job, cid, proto, name, ckpt, "gits", f"{dname} {method} NFE {nfe}")
    cand = Candidate(train=job, eval=ev, base_id=base_job.id, base_solver=base, protocol=proto, family="gits",
                     teacher_id=tid)
    return cand, base_job


def candidate_eval(base: EvalJob, cid: str, proto: EvalProtocol, name: str, ckpt: str, family: str,
                   title: str) -> EvalJob:
    """The evaluate job of a candidate checkpoint (content id ``cid``) under the protocol and on the schedule of its
    base solver's job ``base`` (GITS, GS: candidates without a SamplerSpec of their own)."""
    eid = json_digest({"checkpoint": cid, "protocol": proto.hash})
    common = {k: v for k, v in base.model_dump().items() if k in (
        "store_url", "storage_options", "torch_threads", "dataset", "protocol", "protocol_hash", "grid_samples",
        "reference_spec", "schedule")}
    return EvalJob(**common, id=f"eval-{name}-{eid[:8]}", kind="candidate", checkpoint=ckpt, family=family,
                   result_key=f"evals/{eid}.json", grid_key=f"{ckpt}/samples.png", title=title)


class _EPDSpec(BaseModel):
    """What plan_baseline / _eval_common read of a student (an EPD student has no SamplerSpec)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    solver: str
    nfe: int
    num_steps: int
    afs: bool
    schedule: Any
    base_solver: str
    max_order: Optional[int] = None
    predict_x0: Optional[bool] = None
    lower_order_final: Optional[bool] = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "epd", "solver": self.solver, "nfe": self.nfe, "num_steps": self.num_steps, "afs": self.afs,
                "schedule": self.schedule.to_dict(), "max_order": self.max_order}


def epd_spec(cfg: SweepConfig, s: str, nfe: int, den, d: DatasetConfig) -> _EPDSpec:
    from amed_core.methods import get_method, num_steps_for

    e = cfg.families.epd
    afs = bool(nfe % 2 == 1) if e.afs == "auto" else bool(e.afs)
    steps = num_steps_for(s, nfe, afs)
    return _EPDSpec(solver=s, nfe=nfe, num_steps=steps, afs=afs, schedule=schedule_for(cfg, den, e.schedule_type,
                    e.schedule_rho), base_solver=str(get_method(s).base),
                    max_order=e.max_order if s == "epd+ipndm" else None)


def plan_epd_candidate(cfg: SweepConfig, teacher: TeacherJob, sp: _EPDSpec, proto: EvalProtocol, base: EvalJob,
                       seed: int, tid: str) -> Candidate:
    """Training of EPD tables for ``sp`` on the students' teacher (at the student grid) and its evaluation."""
    from amed_core.methods.epd import EPDTrainConfig

    e, s, nfe, dname = cfg.families.epd, sp.solver, sp.nfe, teacher.name
    tc = EPDTrainConfig(solver=s, num_points=e.num_points, scale_dir=e.scale_dir, scale_time=e.scale_time, afs=sp.afs,
                        max_order=e.max_order, lr=e.lr, seed=seed, loss_weighting=e.loss_weighting,
                        num_trajectories=cfg.teacher.num_trajectories * e.epochs).to_dict()
    cid = json_digest({"teacher": teacher.spec_hash, "spec": sp.to_dict(), "train": tc, "epochs": e.epochs,
                       "batch_size": e.batch_size})
    name = f"{slug(dname)}-{slug(s)}-nfe{nfe}-seed{seed}"
    ckpt = f"checkpoints/{name}-{cid[:12]}"
    eid = json_digest({"checkpoint": cid, "protocol": proto.hash})
    job = TrainJob(id=f"{name}-{cid[:8]}", name=name, store_url=teacher.store_url, storage_options=teacher.storage_options,
                   torch_threads=cfg.compute.torch_threads, dataset=teacher.dataset, solver=s, nfe=nfe, seed=seed,
                   sampler_spec=sp.to_dict(), train={**tc, "batch_size": e.batch_size}, epochs=e.epochs,
                   teacher_hash=teacher.spec_hash, checkpoint=ckpt, family="epd",
                   tags=[f"dataset:{dname}", f"solver:{s}", f"nfe:{nfe}", f"seed:{seed}", "family:epd"])
    ev = EvalJob(**eval_common(cfg, teacher, sp, proto), id=f"eval-{name}-{eid[:8]}", kind="candidate",
                 checkpoint=ckpt, family="epd", result_key=f"evals/{eid}.json", grid_key=f"{ckpt}/samples.png",
                 title=f"{dname} {s} NFE {nfe}")
    return Candidate(train=job, eval=ev, base_id=base.id, base_solver=base.solver, protocol=proto, family="epd",
                     teacher_id=tid)


def plan_gs_teacher(cfg: SweepConfig, d: DatasetConfig, students: TeacherJob, den, store_url: str) -> TeacherJob:
    """The teacher GS trains on: ``train_size + val_size`` trajectories of the sweep's teacher solver from sigma_max to
    sigma_min in ``teacher_steps`` steps, only the two end points stored (GS supervises the final sample only: the
    noise and the teacher's end state; amed_core.families.gs). Its own spec, so AMED's trajectories do not move."""
    from amed_core.teacher import StudentGrid, TeacherSpec

    g, t = cfg.families.gs, cfg.teacher
    n = g.train_size + g.val_size
    spec = TeacherSpec.for_denoiser(den, [StudentGrid(schedule_for(cfg, den, "polynomial", 7.0), 2)], num_trajectories=n,
                                    shard_size=min(n, t.shard_size), sub_steps=g.teacher_steps - 1, solver=t.solver,
                                    dtype=t.dtype, base_seed=t.seed)
    return TeacherJob(name=d.name, role="gs", dataset=students.dataset, spec_json=spec.to_json(),
                      spec_hash=spec.spec_hash, num_shards=spec.num_shards, num_trajectories=n, store_url=store_url,
                      storage_options=dict(cfg.storage_options), reference_spec=students.reference_spec)


def _gs_config(cfg: SweepConfig, den, nfe: int) -> dict[str, Any]:
    """The GSConfig (amed_core.methods.gs) of a GS candidate at ``nfe``, checked here so a bad one fails the plan."""
    from amed_core.methods.gs import GSConfig

    g = cfg.families.gs
    sch = schedule_for(cfg, den, "time_uniform", 1.0)  # the sweep's sigma range (default: the teacher's)
    try:
        gc = GSConfig(steps=nfe, order=min(g.order or nfe, nfe), net_sigma_min=float(sch.sigma_min),
                      net_sigma_max=float(sch.sigma_max), theory=g.theory, t_eps=g.t_eps, end=g.end,
                      s4s_rescale=g.s4s_rescale, clip_model_time=g.clip_model_time, output=g.output, start=g.start)
        from amed_core.families.gs import check_start

        check_start(gc, float(sch.sigma_max))  # the GS teacher starts at the sweep's sigma_max
    except ValueError as e:
        raise ValueError(f"families.gs: at NFE {nfe}: {e}") from None
    return gc.to_dict()


def gs_base_job(cfg: SweepConfig, gt: TeacherJob, den, nfe: int, proto: EvalProtocol, reference: str) -> EvalJob:
    """GS's base solver at ``nfe``: what GS is at its reference initialisation in theory mode, multistep
    DPM-Solver++(3M) (data prediction, no lower-order final step, no thresholding) on a grid uniform in VP time."""
    order = min(cfg.families.gs.order or nfe, nfe, 3)
    entry = PanelEntry(solver="dpmpp", schedule_type="time_uniform", schedule_rho=1.0,
                       options={"max_order": order, "predict_x0": True, "lower_order_final": False,
                                "dynamic_thresholding": False})
    job = panel_job(cfg, gt, den, entry, nfe, proto, reference)
    if job is None:
        raise ValueError(f"families.gs: DPM-Solver++ cannot run at NFE {nfe}")
    return job


def plan_gs_candidate(cfg: SweepConfig, gt: TeacherJob, den, nfe: int, init: str, seed: int, proto: EvalProtocol,
                      base: EvalJob, panel: list[EvalJob], tid: str) -> Candidate:
    """GS at ``nfe`` from ``init`` (``reference`` or ``panel``) with ``seed`` (the shuffling of the training pairs),
    trained on the GS teacher ``gt``. With init ``panel`` the training job waits for the panel's evaluations at this
    NFE (``fit["panel"]``: every entry's id, score key, schedule and options) and starts from the best entry GS can
    express; its id hashes those entries, whose scores are content-addressed too."""
    from amed_core.methods.gs import GSTrainConfig

    g, dname = cfg.families.gs, gt.name
    gc = _gs_config(cfg, den, nfe)
    tc = GSTrainConfig(iterations=g.iterations, batch_size=g.batch_size, lr=g.lr, grad_clip=g.grad_clip,
                       ema_decay=g.ema_decay, eval_every=g.eval_every, keep=g.keep, seed=seed,
                       loss="l2" if g.loss == "l2" else g.loss).to_dict()
    entries = [{"id": b.id, "result_key": b.result_key, "solver": b.solver, "schedule": b.schedule,
                "num_steps": b.num_steps, "options": dict(b.solver_options)} for b in panel] if init == "panel" else []
    fit = {"config": gc, "init": init, "panel": entries, "loss": g.loss, "train_size": g.train_size,
           "val_size": g.val_size}
    cid = json_digest({"teacher": gt.spec_hash, "nfe": nfe, "fit": fit, "train": tc})
    name = f"{slug(dname)}-gs-{init}-nfe{nfe}-seed{seed}"
    ckpt = f"checkpoints/{name}-{cid[:12]}"
    job = TrainJob(id=f"{name}-{cid[:8]}", name=name, store_url=gt.store_url, storage_options=gt.storage_options,
                   torch_threads=cfg.compute.torch_threads, dataset=gt.dataset, solver="gs", nfe=nfe, seed=seed,
                   sampler_spec={"kind": "gs", "solver": "gs", "nfe": nfe, "num_steps": nfe + 1, "init": init, "gs": gc},
                   train={**tc, "num_trajectories": g.train_size}, epochs=1, teacher_hash=gt.spec_hash, checkpoint=ckpt,
                   family="gs", fit=fit,
                   tags=[f"dataset:{dname}", "solver:gs", f"nfe:{nfe}", f"seed:{seed}", f"init:{init}", "family:gs"])
    ev = candidate_eval(base, cid, proto, name, ckpt, "gs", f"{dname} gs ({init} init) NFE {nfe}")
    return Candidate(train=job, eval=ev, base_id=base.id, base_solver=base.solver, protocol=proto, family="gs",
                     teacher_id=tid)
