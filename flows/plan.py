"""The plan of a sweep: what it will run, as typed jobs with content-addressed store keys.

``plan_sweep(cfg) -> SweepPlan`` needs neither Prefect nor Ray; everything that can be checked is checked here,
before any work starts (a teacher that cannot be loaded, an NFE a solver cannot reach): ValueError naming the
dataset / solver / NFE. Per dataset (:func:`plan_dataset`) it loads the teacher once, builds the SamplerSpec of
every (solver, NFE) and the one TeacherSpec serving them all (a :class:`TeacherJob`); per (solver, NFE) the
training-free base solver at the same NFE (:func:`plan_baseline`, an :class:`EvalJob`, shared by the candidates
that compare with it); per (solver, NFE, seed) a :class:`Candidate` (:func:`plan_candidate`: a :class:`TrainJob`
and the :class:`EvalJob` scoring its checkpoint).

Ids and store keys are hashes of what determines the output (teacher spec, SamplerSpec, training config,
evaluation protocol), so a rerun finds what is already committed. The jobs are what Prefect tasks take as
parameters and Ray tasks as arguments; workers read their attributes (``job.checkpoint``), never string keys.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

from flows.config import DatasetConfig, EvalConfig, SamplerConfig, SweepConfig
from flows.results import EvalProtocol
from flows.storage.checksums import json_digest

__all__ = ["TeacherJob", "TrainJob", "EvalJob", "ScoreSettings", "Candidate", "PanelSlot", "SweepPlan", "plan_sweep",
           "plan_dataset", "plan_baseline", "plan_candidate", "plan_panel", "panel_job", "plan_gits_teacher",
           "plan_gits_candidate", "plan_epd_candidate", "teacher_id", "slug"]


def slug(s: str) -> str:
    """A name safe in store keys and run names: ``amed+ipndm`` -> ``amed_ipndm``, ``gmm:a/b`` -> ``gmm-a-b``."""
    return s.replace("+", "_").replace(":", "-").replace("/", "-")


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StoreJob(_Job):
    """What every job of a sweep carries: its id, where the store is, the teacher and the worker's threads."""

    id: str
    store_url: str
    storage_options: dict[str, Any] = {}
    torch_threads: int = 1
    dataset: DatasetConfig  # paths expanded on the driver (Ray workers may lack its environment)


class TeacherJob(_Job):
    """The shared teacher of one dataset: a TeacherSpec (JSON) whose shards the teacher stage generates.

    role "students": the trajectories at the union of the student grids (AMED, EPD); role "gits": a small teacher on
    the fine grid GITS selects from (``families.gits``: warmup trajectories, grid_points points)."""

    name: str                  # the dataset's name
    role: Literal["students", "gits"] = "students"
    dataset: DatasetConfig
    spec_json: str
    spec_hash: str
    num_shards: int
    num_trajectories: int
    store_url: str
    storage_options: dict[str, Any] = {}

    @property
    def key(self) -> str:
        """The teacher's key in a sweep: the dataset's name (role students), ``<name>:gits`` (role gits)."""
        return self.name if self.role == "students" else f"{self.name}:{self.role}"


class ScoreSettings(_Job):
    """How an evaluate job scores (``EvalProtocol`` plus what only the worker needs: batch size, FID inputs)."""

    metric: Literal["fd_exact", "rmse", "fid"]
    num_samples: int
    seed: int
    batch_size: int
    reference_steps: int
    fid_stats: Optional[str] = None            # metric fid: fsspec URLs of the user's copies
    inception_weights: Optional[str] = None


class EvalJob(_StoreJob):
    """Score a committed checkpoint (``checkpoint``) or a training-free solver (``solver``, ``num_steps``)."""

    kind: Literal["baseline", "candidate"]
    protocol: ScoreSettings
    protocol_hash: str
    grid_samples: int
    reference_solver: str                      # metric rmse: the teacher solver of the near-exact reference
    schedule: dict[str, Any]                   # ScheduleSpec JSON
    result_key: str                            # evals/<hash>.json: the cached score
    grid_key: str                              # the PNG of the first grid_samples samples
    title: str
    checkpoint: Optional[str] = None           # candidate
    solver: Optional[str] = None               # baseline
    nfe: Optional[int] = None
    num_steps: Optional[int] = None
    solver_options: dict[str, Any] = {}
    tags: list[str] = []
    family: str = "amed"                       # candidate: the checkpoint's family; baseline: "free"
    teacher_identity: dict[str, Any] = {}      # baseline: written into its free sampler.json


class TrainJob(_StoreJob):
    """Train one predictor on the stored teacher and commit ``checkpoint/`` (train.json last)."""

    name: str
    solver: str
    nfe: int
    seed: int
    sampler_spec: dict[str, Any]               # SamplerSpec JSON
    train: dict[str, Any]                      # amed_core TrainConfig fields
    epochs: int
    teacher_hash: str
    checkpoint: str                            # key of the checkpoint folder in the run store
    tags: list[str] = []
    family: str = "amed"                       # amed | gits | epd (what train_job fits)
    fit: dict[str, Any] = {}                   # gits: metric, coeff, warmup, options, afs; epd: EPDTrainConfig fields


class Candidate(_Job):
    """One trained predictor of the sweep: its training, its evaluation and the baseline it is compared with."""

    train: TrainJob
    eval: EvalJob
    base_id: str
    base_solver: str
    protocol: EvalProtocol
    family: str = "amed"
    teacher_id: str = ""

    @property
    def id(self) -> str:
        return self.train.id

    @property
    def name(self) -> str:
        return self.train.name


class PanelSlot(_Job):
    """The training-free panel of one (dataset, NFE): ids of its evaluate jobs (in ``SweepPlan.baselines``)."""

    dataset: str
    nfe: int
    teacher_id: str
    protocol: EvalProtocol
    entries: list[str]


class SweepPlan(_Job):
    sweep: str
    store_url: str
    storage_options: dict[str, Any] = {}
    teachers: list[TeacherJob]
    candidates: list[Candidate]
    baselines: list[EvalJob]
    panels: list[PanelSlot] = []

    def panel_for(self, dataset: str, nfe: int) -> Optional[PanelSlot]:
        return next((p for p in self.panels if p.dataset == dataset and p.nfe == nfe), None)


# ---------------------------------------------------------------------------------------------
# Planning.

def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Teachers, training jobs and evaluation jobs of a sweep, with content-addressed store keys.

    Raises ValueError (naming the dataset/solver/NFE) when a teacher cannot be loaded or a combination
    cannot be built.
    """
    store_url = cfg.resolved_store_url()
    teachers, candidates, baselines, panels = [], [], {}, []
    for d in cfg.datasets:
        teacher, den, specs = plan_dataset(cfg, d, store_url)
        teachers.append(teacher)
        reference = den.identity().get("content_sha256") or json_digest(den.identity())
        tid = teacher_id(d, den)
        proto = EvalProtocol(metric=cfg.evaluation.metric, num_samples=cfg.evaluation.num_samples,
                             seed=cfg.evaluation.seed, reference=_reference(cfg.evaluation, reference, cfg.teacher.solver))
        slots: dict[int, dict[str, EvalJob]] = {nfe: {} for nfe in cfg.nfes}

        def add(job: EvalJob, nfe: int) -> EvalJob:
            job = baselines.setdefault(job.id, job)
            slots[nfe].setdefault(job.id, job)
            return job

        for (s, nfe), sp in specs.items():
            base = plan_baseline(cfg, teacher, sp, proto, reference)
            if cfg.panel.include_base_solvers or get_family_name(s) != "amed":
                base = add(base, nfe)
            else:
                base = baselines.setdefault(base.id, base)
            for seed in cfg.seeds:
                if get_family_name(s) == "epd":
                    candidates.append(plan_epd_candidate(cfg, teacher, sp, proto, base, seed, tid))
                else:
                    candidates.append(plan_candidate(cfg, teacher, sp, proto, base, seed).model_copy(
                        update={"teacher_id": tid}))
        for nfe in cfg.nfes:
            for entry in plan_panel(cfg, teacher, den, nfe, proto, reference):
                add(entry, nfe)
        if cfg.families.gits.solvers:
            gt = plan_gits_teacher(cfg, d, teacher, den, store_url)
            teachers.append(gt)
            for b in cfg.families.gits.solvers:
                for nfe in cfg.nfes:
                    planned = plan_gits_candidate(cfg, gt, den, b, nfe, proto, reference, tid)
                    if planned is not None:
                        candidates.append(planned[0])
                        add(planned[1], nfe)
        panels += [PanelSlot(dataset=d.name, nfe=nfe, teacher_id=tid, protocol=proto, entries=list(jobs))
                   for nfe, jobs in slots.items()]
    return SweepPlan(sweep=cfg.name, store_url=store_url, storage_options=dict(cfg.storage_options),
                     teachers=teachers, candidates=candidates, baselines=list(baselines.values()), panels=panels)


def get_family_name(method: str) -> str:
    from amed_core.methods import get_method

    return get_method(method).family


def teacher_id(d: DatasetConfig, den) -> str:
    """The teacher's identity in registered model names: the user's ``model_id``, else ``<dataset>-<hash8>``."""
    if d.model_id:
        return d.model_id
    ident = den.identity()
    digest = ident.get("content_sha256") or json_digest(ident)
    return f"{d.name}-{digest[:8]}"


def plan_dataset(cfg: SweepConfig, d: DatasetConfig, store_url: str):
    """(TeacherJob, the loaded teacher, {(solver, nfe): SamplerSpec}) of one dataset."""
    from amed_core.adapters import expand_paths
    from amed_core.teacher import StudentGrid, TeacherSpec
    from flows.cluster.probe import probe_teacher

    try:  # identity, sigma range, VP table, shape: from a probe (Ray task / child process), no weights in this process
        den = probe_teacher(d)
    except (ValueError, OSError) as e:
        raise ValueError(f"datasets[{d.name}].teacher: {e}") from None
    teacher, options = expand_paths(d.teacher, dict(d.options or {}))
    weights = os.path.expandvars(os.path.expanduser(d.weights_url)) if d.weights_url else d.weights_url
    ds = d.model_copy(update={"teacher": teacher, "options": options, "weights_url": weights})
    specs = {}
    for s in cfg.solvers:
        sc = cfg.sampler_for(s)
        schedule = _schedule(sc, den, d)
        pc = _predictor_config(cfg, s, sc)
        for nfe in cfg.nfes:
            try:
                specs[(s, nfe)] = _sampler_spec(s, nfe, sc, schedule, pc, den)
            except ValueError as e:
                raise ValueError(f"solvers/nfes: {s} at NFE {nfe} on dataset {d.name}: {e}") from None
    for s in cfg.families.epd.solvers:
        for nfe in cfg.nfes:
            try:
                specs[(s, nfe)] = _epd_spec(cfg, s, nfe, den, d)
            except ValueError as e:
                raise ValueError(f"families.epd: {s} at NFE {nfe} on dataset {d.name}: {e}") from None
    grids = sorted({StudentGrid(sp.schedule, sp.num_steps) for sp in specs.values()}, key=lambda g: g.num_steps)
    t = cfg.teacher
    tspec = TeacherSpec.for_denoiser(den, grids, num_trajectories=t.num_trajectories, shard_size=t.shard_size,
                                     sub_steps=t.M, solver=t.solver, dtype=t.dtype, base_seed=t.seed)
    job = TeacherJob(name=d.name, dataset=ds, spec_json=tspec.to_json(), spec_hash=tspec.spec_hash,
                     num_shards=tspec.num_shards, num_trajectories=t.num_trajectories, store_url=store_url,
                     storage_options=dict(cfg.storage_options))
    return job, den, specs


def plan_baseline(cfg: SweepConfig, teacher: TeacherJob, sp, proto: EvalProtocol, reference: str) -> EvalJob:
    """The training-free base solver of ``sp`` at the same NFE, schedule family and noise."""
    from amed_core.methods import num_steps_for

    base, nfe, name = sp.base_solver, sp.nfe, teacher.name
    bopts = _base_options(base, sp)
    try:
        bsteps = num_steps_for(base, nfe, sp.afs)
    except ValueError as e:
        raise ValueError(f"nfes: base solver {base} cannot run at NFE {nfe}: {e}") from None
    bid = json_digest({"reference": reference, "solver": base, "steps": bsteps, "schedule": sp.schedule.to_dict(),
                       "options": bopts, "protocol": proto.hash})
    return EvalJob(**_eval_common(cfg, teacher, sp, proto), id=f"base-{slug(name)}-{base}-nfe{nfe}-{bid[:8]}",
                   kind="baseline", solver=base, nfe=nfe, num_steps=bsteps, solver_options=bopts,
                   result_key=f"evals/{bid}.json", grid_key=f"evals/{bid}-samples.png", title=f"{name} {base} NFE {nfe}",
                   tags=[f"dataset:{name}", f"solver:{base}", f"nfe:{nfe}", "baseline"], family="free",
                   checkpoint=f"checkpoints/free-{slug(name)}-{base}-nfe{nfe}-{bid[:12]}",
                   teacher_identity=_identity(teacher))


def _identity(teacher: TeacherJob) -> dict[str, Any]:
    import json

    return dict(json.loads(teacher.spec_json).get("teacher") or {})


def _schedule_for(cfg: SweepConfig, den, schedule_type: str, rho: float):
    from amed_core.schedules import ScheduleSpec

    sc = cfg.sampler
    return ScheduleSpec(schedule_type=schedule_type, rho=rho, sigma_min=sc.sigma_min or float(den.sigma_min),
                        sigma_max=sc.sigma_max or float(den.sigma_max))


def panel_job(cfg: SweepConfig, teacher: TeacherJob, den, entry, nfe: int, proto: EvalProtocol,
              reference: str) -> Optional[EvalJob]:
    """The evaluate job of one panel entry at ``nfe`` (None where the solver cannot spend exactly ``nfe``). Its id and
    score key use plan_baseline's hash, so an entry equal to a candidate's base solver is evaluated once."""
    from amed_core.methods import get_method, num_steps_for, pick_afs

    m = get_method(entry.solver)
    default = m.default_schedule
    schedule = _schedule_for(cfg, den, entry.schedule_type or default.schedule_type,
                             entry.schedule_rho if entry.schedule_rho is not None else
                             (default.rho if entry.schedule_type in (None, default.schedule_type) else 7.0))
    afs = pick_afs(entry.solver, nfe, None if entry.afs == "auto" else entry.afs)
    opts = {**dict(m.default_options), **dict(entry.options), "afs": afs}
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
                   grid_samples=ev.grid_samples, reference_solver=cfg.teacher.solver, schedule=schedule.to_dict(),
                   result_key=f"evals/{bid}.json", grid_key=f"evals/{bid}-samples.png",
                   title=f"{name} {solver} NFE {nfe}", solver=solver, nfe=nfe, num_steps=steps, solver_options=opts,
                   tags=[f"dataset:{name}", f"solver:{solver}", f"nfe:{nfe}", "baseline", "panel"], family="free",
                   checkpoint=f"checkpoints/free-{slug(name)}-{solver}-nfe{nfe}-{bid[:12]}",
                   teacher_identity=_identity(teacher))


def plan_panel(cfg: SweepConfig, teacher: TeacherJob, den, nfe: int, proto: EvalProtocol, reference: str) -> list[EvalJob]:
    """The configured panel entries at ``nfe`` (unreachable combinations skipped)."""
    from amed_core.families.free import option_sets

    from flows.config import PanelEntry

    entries = list(cfg.panel.entries)
    for solver in cfg.panel.expand:  # every option set that reaches this NFE
        entries += [PanelEntry(solver=solver, schedule_type=o["schedule"].schedule_type, schedule_rho=o["schedule"].rho,
                               afs=o["afs"], options={k: v for k, v in o["options"].items()})
                    for o in option_sets(solver, nfe)]
    jobs = (panel_job(cfg, teacher, den, e, nfe, proto, reference) for e in entries)
    return [j for j in jobs if j is not None]


def plan_gits_teacher(cfg: SweepConfig, d: DatasetConfig, students: TeacherJob, den, store_url: str) -> TeacherJob:
    """A small teacher on the fine grid GITS selects from: ``families.gits.warmup`` trajectories at
    ``grid_points`` points (the students' teacher keeps only the union of the student grids, too coarse to select
    from; its spec stays unchanged, so AMED's trajectories do not move)."""
    from amed_core.teacher import StudentGrid, TeacherSpec

    g, t = cfg.families.gits, cfg.teacher
    schedule = _schedule_for(cfg, den, g.schedule_type, g.schedule_rho)
    spec = TeacherSpec.for_denoiser(den, [StudentGrid(schedule, g.grid_points)], num_trajectories=g.warmup,
                                    shard_size=g.warmup, sub_steps=g.sub_steps, solver=t.solver, dtype=t.dtype,
                                    base_seed=t.seed)
    return TeacherJob(name=d.name, role="gits", dataset=students.dataset, spec_json=spec.to_json(),
                      spec_hash=spec.spec_hash, num_shards=spec.num_shards, num_trajectories=g.warmup,
                      store_url=store_url, storage_options=dict(cfg.storage_options))


def plan_gits_candidate(cfg: SweepConfig, gt: TeacherJob, den, base: str, nfe: int, proto: EvalProtocol,
                        reference: str, tid: str):
    """(Candidate, its base solver's panel job) of ``gits+<base>`` at ``nfe``, or None where ``base`` cannot spend
    exactly ``nfe`` without AFS. The fit reads the GITS teacher ``gt``; the checkpoint is a sampler.json."""
    from amed_core.methods import get_method, num_steps_for

    from flows.config import PanelEntry

    g = cfg.families.gits
    opts = {**dict(get_method(base).default_options), **dict(g.options.get(base, {}))}
    try:
        num_steps_for(base, nfe, False, opts)
    except ValueError:
        return None
    base_job = panel_job(cfg, gt, den, PanelEntry(solver=base, options=dict(g.options.get(base, {}))), nfe, proto,
                         reference)
    method, dname = f"gits+{base}", gt.name
    fit = {"metric": g.metric, "coeff": g.coeff, "warmup": g.warmup, "options": opts, "afs": False}
    cid = json_digest({"teacher": gt.spec_hash, "method": method, "nfe": nfe, "fit": fit})
    name = f"{slug(dname)}-{slug(method)}-nfe{nfe}"
    ckpt = f"checkpoints/{name}-{cid[:12]}"
    job = TrainJob(id=f"{name}-{cid[:8]}", name=name, store_url=gt.store_url, storage_options=gt.storage_options,
                   torch_threads=cfg.compute.torch_threads, dataset=gt.dataset, solver=method, nfe=nfe, seed=0,
                   sampler_spec={}, train={"num_trajectories": g.warmup, "batch_size": g.warmup}, epochs=1,
                   teacher_hash=gt.spec_hash, checkpoint=ckpt, family="gits", fit=fit,
                   tags=[f"dataset:{dname}", f"solver:{method}", f"nfe:{nfe}", "family:gits"])
    eid = json_digest({"checkpoint": cid, "protocol": proto.hash})
    common = {k: v for k, v in base_job.model_dump().items() if k in (
        "store_url", "storage_options", "torch_threads", "dataset", "protocol", "protocol_hash", "grid_samples",
        "reference_solver", "schedule")}
    ev = EvalJob(**common, id=f"eval-{name}-{eid[:8]}", kind="candidate", checkpoint=ckpt, family="gits",
                 result_key=f"evals/{eid}.json", grid_key=f"{ckpt}/samples.png", title=f"{dname} {method} NFE {nfe}")
    cand = Candidate(train=job, eval=ev, base_id=base_job.id, base_solver=base, protocol=proto, family="gits",
                     teacher_id=tid)
    return cand, base_job


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


def _epd_spec(cfg: SweepConfig, s: str, nfe: int, den, d: DatasetConfig) -> _EPDSpec:
    from amed_core.methods import get_method, num_steps_for

    e = cfg.families.epd
    afs = bool(nfe % 2 == 1) if e.afs == "auto" else bool(e.afs)
    steps = num_steps_for(s, nfe, afs)
    return _EPDSpec(solver=s, nfe=nfe, num_steps=steps, afs=afs, schedule=_schedule_for(cfg, den, e.schedule_type,
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
    ev = EvalJob(**_eval_common(cfg, teacher, sp, proto), id=f"eval-{name}-{eid[:8]}", kind="candidate",
                 checkpoint=ckpt, family="epd", result_key=f"evals/{eid}.json", grid_key=f"{ckpt}/samples.png",
                 title=f"{dname} {s} NFE {nfe}")
    return Candidate(train=job, eval=ev, base_id=base.id, base_solver=base.solver, protocol=proto, family="epd",
                     teacher_id=tid)


def plan_candidate(cfg: SweepConfig, teacher: TeacherJob, sp, proto: EvalProtocol, base: EvalJob, seed: int) -> Candidate:
    """Training of ``sp`` with ``seed`` against the dataset's teacher, and the evaluation of its checkpoint."""
    from amed_core.amed.train import TrainConfig

    s, nfe, dname = sp.solver, sp.nfe, teacher.name
    tc = cfg.train_for(s)
    train = TrainConfig(num_trajectories=cfg.teacher.num_trajectories * tc.epochs, batch_size=tc.batch_size, lr=tc.lr,
                        seed=seed, loss_weighting=tc.loss_weighting).to_dict()
    cid = json_digest({"teacher": teacher.spec_hash, "spec": sp.to_dict(), "train": train, "epochs": tc.epochs})
    name = f"{slug(dname)}-{slug(s)}-nfe{nfe}-seed{seed}"
    ckpt = f"checkpoints/{name}-{cid[:12]}"
    eid = json_digest({"checkpoint": cid, "protocol": proto.hash})
    job = TrainJob(id=f"{name}-{cid[:8]}", name=name, store_url=teacher.store_url, storage_options=teacher.storage_options,
                   torch_threads=cfg.compute.torch_threads, dataset=teacher.dataset, solver=s, nfe=nfe, seed=seed,
                   sampler_spec=sp.to_dict(), train=train, epochs=tc.epochs, teacher_hash=teacher.spec_hash,
                   checkpoint=ckpt, tags=[f"dataset:{dname}", f"solver:{s}", f"nfe:{nfe}", f"seed:{seed}"])
    ev = EvalJob(**_eval_common(cfg, teacher, sp, proto), id=f"eval-{name}-{eid[:8]}", kind="candidate",
                 checkpoint=ckpt, result_key=f"evals/{eid}.json", grid_key=f"{ckpt}/samples.png",
                 title=f"{dname} {s} NFE {nfe}")
    return Candidate(train=job, eval=ev, base_id=base.id, base_solver=base.solver, protocol=proto)


# ---------------------------------------------------------------------------------------------
# Pieces of a plan.

def _schedule(sc: SamplerConfig, den, d: DatasetConfig):
    from amed_core.schedules import ScheduleSpec

    table = getattr(den, "alphas_cumprod", None) if sc.schedule_type == "discrete" else None
    if sc.schedule_type == "discrete" and table is None:
        raise ValueError(f"sampler.schedule_type: 'discrete' needs a model with a VP table (alphas_cumprod); "
                         f"teacher {d.teacher!r} of dataset {d.name} has none")
    return ScheduleSpec(schedule_type=sc.schedule_type, rho=sc.schedule_rho,
                        sigma_min=sc.sigma_min or float(den.sigma_min), sigma_max=sc.sigma_max or float(den.sigma_max),
                        alphas_cumprod=None if table is None else tuple(float(a) for a in table))


def _predictor_config(cfg: SweepConfig, s: str, sc: SamplerConfig):
    from amed_core.amed import PredictorConfig

    pc = PredictorConfig(scale_dir=sc.scale_dir, scale_time=sc.scale_time)
    if cfg.train_for(s).hidden_dim:
        pc = replace(pc, hidden_dim=cfg.train_for(s).hidden_dim)
    return pc


def _sampler_spec(s: str, nfe: int, sc: SamplerConfig, schedule, pc, den):
    """The student's SamplerSpec, with the sampler options its method accepts (the method table's ``options``:
    multistep plugins take max_order / afs_in_history, amed+dpmpp also DPM-Solver++'s flags)."""
    from amed_core.amed import SamplerSpec
    from amed_core.methods import get_method

    accepted = get_method(s).options
    plugin = {k: v for k, v in (("max_order", sc.max_order), ("afs_in_history", sc.afs_in_history),
                                ("predict_x0", sc.predict_x0), ("lower_order_final", sc.lower_order_final))
              if k in accepted}
    return SamplerSpec.create(s, nfe, afs=sc.afs_for(nfe), schedule=schedule, predictor=pc, denoiser=den, **plugin)


def _base_options(base: str, sp) -> dict[str, Any]:
    """The base solver's options matching the student's (AFS, order, DPM-Solver++ flags), as far as the base accepts
    them (the method table's ``options``); the order is capped at the base's default, its highest (dpmpp: 3)."""
    from amed_core.methods import get_method

    m = get_method(base)
    bopts: dict[str, Any] = {"afs": sp.afs}
    if "max_order" in m.options and sp.max_order is not None:
        bopts["max_order"] = min(sp.max_order, m.default_options["max_order"])
    for k in ("predict_x0", "lower_order_final"):
        if k in m.options:
            bopts[k] = getattr(sp, k)
    return bopts


def _eval_common(cfg: SweepConfig, teacher: TeacherJob, sp, proto: EvalProtocol) -> dict[str, Any]:
    ev = cfg.evaluation
    settings = ScoreSettings(metric=ev.metric, num_samples=ev.num_samples, seed=ev.seed, batch_size=ev.batch_size,
                             reference_steps=ev.reference_steps,
                             **({"fid_stats": ev.fid_stats, "inception_weights": ev.inception_weights}
                                if ev.metric == "fid" else {}))
    return {"store_url": teacher.store_url, "storage_options": teacher.storage_options,
            "torch_threads": cfg.compute.torch_threads, "dataset": teacher.dataset, "protocol": settings,
            "protocol_hash": proto.hash, "grid_samples": ev.grid_samples, "reference_solver": cfg.teacher.solver,
            "schedule": sp.schedule.to_dict()}


def _reference(ev: EvalConfig, reference: str, teacher_solver: str) -> str:
    """What the samples are compared with (EvalProtocol.reference): a number is comparable only under the same one."""
    if ev.metric == "rmse":
        return f"{reference[:16]};{teacher_solver}@{ev.reference_steps}"
    if ev.metric == "fid":  # the statistics and the network both define the number
        return f"fid:{ev.fid_stats};inception:{ev.inception_weights}"
    return f"gmm:{reference[:16]}"
