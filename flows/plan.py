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

__all__ = ["TeacherJob", "TrainJob", "EvalJob", "ScoreSettings", "Candidate", "SweepPlan", "plan_sweep",
           "plan_dataset", "plan_baseline", "plan_candidate", "slug"]


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
    """The shared teacher of one dataset: a TeacherSpec (JSON) whose shards the teacher stage generates."""

    name: str                  # the dataset's name
    dataset: DatasetConfig
    spec_json: str
    spec_hash: str
    num_shards: int
    num_trajectories: int
    store_url: str
    storage_options: dict[str, Any] = {}


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


class Candidate(_Job):
    """One trained predictor of the sweep: its training, its evaluation and the baseline it is compared with."""

    train: TrainJob
    eval: EvalJob
    base_id: str
    base_solver: str
    protocol: EvalProtocol

    @property
    def id(self) -> str:
        return self.train.id

    @property
    def name(self) -> str:
        return self.train.name


class SweepPlan(_Job):
    sweep: str
    store_url: str
    storage_options: dict[str, Any] = {}
    teachers: list[TeacherJob]
    candidates: list[Candidate]
    baselines: list[EvalJob]


# ---------------------------------------------------------------------------------------------
# Planning.

def plan_sweep(cfg: SweepConfig) -> SweepPlan:
    """Teachers, training jobs and evaluation jobs of a sweep, with content-addressed store keys.

    Raises ValueError (naming the dataset/solver/NFE) when a teacher cannot be loaded or a combination
    cannot be built.
    """
    store_url = cfg.resolved_store_url()
    teachers, candidates, baselines = [], [], {}
    for d in cfg.datasets:
        teacher, den, specs = plan_dataset(cfg, d, store_url)
        teachers.append(teacher)
        reference = den.identity().get("content_sha256") or json_digest(den.identity())
        for (s, nfe), sp in specs.items():
            proto = EvalProtocol(metric=cfg.evaluation.metric, num_samples=cfg.evaluation.num_samples,
                                 seed=cfg.evaluation.seed, reference=_reference(cfg.evaluation, reference, cfg.teacher.solver))
            base = plan_baseline(cfg, teacher, sp, proto, reference)
            base = baselines.setdefault((d.name, base.solver, nfe, json_digest(base.solver_options)), base)
            for seed in cfg.seeds:
                candidates.append(plan_candidate(cfg, teacher, sp, proto, base, seed))
    return SweepPlan(sweep=cfg.name, store_url=store_url, storage_options=dict(cfg.storage_options),
                     teachers=teachers, candidates=candidates, baselines=list(baselines.values()))


def plan_dataset(cfg: SweepConfig, d: DatasetConfig, store_url: str):
    """(TeacherJob, the loaded teacher, {(solver, nfe): SamplerSpec}) of one dataset."""
    from amed_core.adapters import expand_paths
    from amed_core.denoisers import load_teacher
    from amed_core.teacher import StudentGrid, TeacherSpec

    try:
        den = load_teacher(d.teacher, **d.load_kwargs())
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
                   tags=[f"dataset:{name}", f"solver:{base}", f"nfe:{nfe}", "baseline"])


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
