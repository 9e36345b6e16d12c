"""``plan_sweep``: per dataset the teacher (:func:`plan_dataset`), per (solver, NFE) the base solver
(:func:`plan_baseline`), per (solver, NFE, seed) an AMED candidate (:func:`plan_candidate`); the panel, GITS, EPD and
GS candidates come from flows.plan.families. The plan's overview is the package docstring (flows.plan)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Optional

from flows.config import DatasetConfig, EvalConfig, SamplerConfig, SweepConfig
from flows.plan.common import eval_common, identity, students_teacher
from flows.plan.families import (epd_spec, gs_base_job, plan_epd_candidate, plan_gits_candidate, plan_gits_teacher,
                                 plan_gs_candidate, plan_gs_teacher, plan_panel)
from flows.plan.jobs import Candidate, EvalJob, PanelSlot, SweepPlan, TeacherJob, TrainJob, slug
from flows.results import EvalProtocol
from flows.storage.checksums import json_digest

__all__ = ["plan_sweep", "plan_dataset", "plan_reference", "plan_baseline", "plan_candidate", "teacher_id",
           "get_family_name", "probe_dataset", "recipe_specs"]


def plan_sweep(cfg: SweepConfig, winners: dict | None = None) -> SweepPlan:
    """Teachers, training jobs and evaluation jobs of a sweep, with content-addressed store keys.

    With ``init.mode: panel`` (or ``both``) the learned candidates start from the panel's winners (issue 21): without
    ``winners`` the plan holds the panel and its ranking round only (``pending_init``); ``winners`` ({(dataset, NFE):
    the winning entry's EvalJob}, :func:`flows.plan.init.choose`) completes it with the teachers and candidates
    (``both``: plus the recipe's AMED students of ``solvers``, on the same teacher).

    Raises ValueError (naming the dataset/solver/NFE) when a teacher cannot be loaded or a combination
    cannot be built.
    """
    from flows.plan.init import plan_panel_starts, plan_rank

    store_url = cfg.resolved_store_url()
    teachers, candidates, baselines, panels, ranks = [], [], {}, [], []
    panel_start = cfg.init.mode in ("panel", "both")
    for d in cfg.datasets:
        if panel_start:
            den, ds = probe_dataset(d)
            teacher, specs = None, {}
            owner = _panel_owner(cfg, d, ds, store_url)
        else:
            teacher, den, specs = plan_dataset(cfg, d, store_url)
            owner = teacher
        refs = plan_reference(cfg, owner, den, store_url)  # metric rmse: the stored near-exact reference + check
        if refs:
            owner = owner.model_copy(update={"reference_spec": refs[0].spec_json})
            teacher = owner if teacher is not None else None
        teachers += [t for t in (teacher, *refs) if t is not None]
        reference = den.identity().get("content_sha256") or json_digest(den.identity())
        tid = teacher_id(d, den)
        proto = EvalProtocol(metric=cfg.evaluation.metric, num_samples=cfg.evaluation.num_samples,
                             seed=cfg.evaluation.seed,
                             reference=_reference(cfg.evaluation, reference, refs[0].spec_hash if refs else ""))
        slots: dict[int, dict[str, EvalJob]] = {nfe: {} for nfe in cfg.nfes}

        def add(job: EvalJob, nfe: int) -> EvalJob:
            job = baselines.setdefault(job.id, job)
            slots[nfe].setdefault(job.id, job)
            return job

        for (s, nfe), sp in specs.items():
            base = plan_baseline(cfg, teacher, sp, proto, reference)
            if cfg.panel.include_base_solvers or get_family_name(s) != "amed":
                base = add(base, nfe)
            else:  # panel.include_base_solvers false: the base solver is not evaluated; the panel is the baseline
                base = None
            for seed in cfg.seeds:
                if get_family_name(s) == "epd":
                    candidates.append(plan_epd_candidate(cfg, teacher, sp, proto, base, seed, tid))
                else:
                    candidates.append(plan_candidate(cfg, teacher, sp, proto, base, seed).model_copy(
                        update={"teacher_id": tid}))
        for nfe in cfg.nfes:
            for entry in plan_panel(cfg, owner, den, nfe, proto, reference):
                add(entry, nfe)
        ranks += [r for nfe in cfg.nfes if (r := plan_rank(cfg, d, nfe, list(slots[nfe].values()), proto)) is not None]
        if panel_start:
            if winners is not None:  # mode both: the recipe's AMED students too, on the same teacher
                from amed_core.teacher import StudentGrid

                recipe = recipe_specs(cfg, d, den, epd=False) if cfg.init.mode == "both" else {}
                started = plan_panel_starts(cfg, d, ds, den, winners, proto, tid, store_url,
                                            extra_grids=[StudentGrid(sp.schedule, sp.num_steps) for sp in recipe.values()],
                                            reference_spec=owner.reference_spec)
                teachers += started.teachers
                candidates += started.candidates
                for (s, nfe), sp in recipe.items():  # their base solvers are scored in full, not ranked
                    base = plan_baseline(cfg, started.teachers[0], sp, proto, reference)
                    base = baselines.setdefault(base.id, base)
                    candidates += [plan_candidate(cfg, started.teachers[0], sp, proto, base, seed).model_copy(
                        update={"teacher_id": tid}) for seed in cfg.seeds]
        elif cfg.families.gits.solvers:
            gt = plan_gits_teacher(cfg, d, teacher, den, store_url)
            teachers.append(gt)
            for b in cfg.families.gits.solvers:
                for nfe in cfg.nfes:
                    planned = plan_gits_candidate(cfg, gt, den, b, nfe, proto, reference, tid)
                    if planned is not None:
                        candidates.append(planned[0])
                        add(planned[1], nfe)
        if cfg.families.gs.inits:  # last: a panel-initialised GS reads the whole panel of its NFE
            gst = plan_gs_teacher(cfg, d, owner, den, store_url)
            teachers.append(gst)
            for nfe in cfg.nfes:
                base = add(gs_base_job(cfg, gst, den, nfe, proto, reference), nfe)
                candidates += [plan_gs_candidate(cfg, gst, den, nfe, init, seed, proto, base, list(slots[nfe].values()),
                                                 tid) for init in cfg.families.gs.inits for seed in cfg.seeds]
        panels += [PanelSlot(dataset=d.name, nfe=nfe, teacher_id=tid, protocol=proto, entries=list(jobs))
                   for nfe, jobs in slots.items()]
    return SweepPlan(sweep=cfg.name, store_url=store_url, storage_options=dict(cfg.storage_options),
                     teachers=teachers, candidates=candidates, baselines=list(baselines.values()), panels=panels,
                     rank=ranks, pending_init=panel_start and winners is None)


def _panel_owner(cfg: SweepConfig, d: DatasetConfig, ds: DatasetConfig, store_url: str) -> TeacherJob:
    """What panel_job reads of a teacher job when the students' teacher is not planned yet: the dataset, store and
    name (its spec is the panel's: no student grids)."""
    return TeacherJob(name=d.name, dataset=ds, spec_json="{}", spec_hash="", num_shards=0, num_trajectories=0,
                      store_url=store_url, storage_options=dict(cfg.storage_options))


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


def probe_dataset(d: DatasetConfig):
    """(the probed teacher, the dataset with its paths expanded): identity, sigma range, VP table, shape from a probe
    (Ray task / child process), no weights in this process."""
    from amed_core.adapters import expand_paths
    from flows.cluster.probe import probe_teacher

    try:
        den = probe_teacher(d)
    except (ValueError, OSError) as e:
        raise ValueError(f"datasets[{d.name}].teacher: {e}") from None
    teacher, options = expand_paths(d.teacher, dict(d.options or {}))
    weights = os.path.expandvars(os.path.expanduser(d.weights_url)) if d.weights_url else d.weights_url
    return den, d.model_copy(update={"teacher": teacher, "options": options, "weights_url": weights})


def plan_dataset(cfg: SweepConfig, d: DatasetConfig, store_url: str):
    """(TeacherJob, the loaded teacher, {(solver, nfe): SamplerSpec}) of one dataset."""
    from amed_core.teacher import StudentGrid

    den, ds = probe_dataset(d)
    specs = recipe_specs(cfg, d, den)
    grids = sorted({StudentGrid(sp.schedule, sp.num_steps) for sp in specs.values()}, key=lambda g: g.num_steps)
    return students_teacher(cfg, d, ds, den, grids, store_url), den, specs


def recipe_specs(cfg: SweepConfig, d: DatasetConfig, den, *, epd: bool = True) -> dict:
    """{(solver, nfe): spec} of the recipe's students: every AMED solver of ``solvers`` (a SamplerSpec) and, with
    ``epd``, every EPD solver of ``families.epd`` (its student spec)."""
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
    for s in cfg.families.epd.solvers if epd else ():
        for nfe in cfg.nfes:
            try:
                specs[(s, nfe)] = epd_spec(cfg, s, nfe, den, d)
            except ValueError as e:
                raise ValueError(f"families.epd: {s} at NFE {nfe} on dataset {d.name}: {e}") from None
    return specs


def plan_reference(cfg: SweepConfig, teacher: TeacherJob, den, store_url: str) -> list[TeacherJob]:
    """Metric rmse: the dataset's near-exact reference (role "reference": DPM-Solver++(3M) on
    ``evaluation.reference_steps`` log-SNR points, float64, one per evaluation seed) and its convergence check (role
    "reference_check": 2N - 1 points on ``reference_check_samples`` seeds), stored like teacher shards; every
    evaluate job of the dataset scores against the first. Empty for other metrics. The reference spans the sweep's
    sigma range; a solver whose own range differs could not be compared with it and is refused here."""
    from amed_core.evaluate.reference import reference_check_spec, reference_spec

    ev = cfg.evaluation
    if ev.metric != "rmse":
        return []
    lo, hi = cfg.sampler.sigma_min or float(den.sigma_min), cfg.sampler.sigma_max or float(den.sigma_max)
    for s, sc in cfg.solver_options.items():
        for name, mine, sweep in (("sigma_min", sc.sigma_min, lo), ("sigma_max", sc.sigma_max, hi)):
            if mine is not None and mine != sweep:
                raise ValueError(f"solver_options.{s}.{name}: {mine} differs from the sweep's {name} ({sweep}); under "
                                 "metric rmse every sampler is scored against one reference solution over one sigma "
                                 f"range: set sampler.{name} instead")
    spec = reference_spec(den, seed=ev.seed, num_samples=ev.num_samples, num_points=ev.reference_steps,
                          sigma_min=lo, sigma_max=hi)
    check = reference_check_spec(spec, ev.reference_check_samples)
    return [TeacherJob(name=teacher.name, role=role, dataset=teacher.dataset, spec_json=s.to_json(),
                       spec_hash=s.spec_hash, num_shards=s.num_shards, num_trajectories=s.num_trajectories,
                       store_url=store_url, storage_options=dict(cfg.storage_options))
            for role, s in (("reference", spec), ("reference_check", check))]


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
    return EvalJob(**eval_common(cfg, teacher, sp, proto), id=f"base-{slug(name)}-{base}-nfe{nfe}-{bid[:8]}",
                   kind="baseline", solver=base, nfe=nfe, num_steps=bsteps, solver_options=bopts,
                   result_key=f"evals/{bid}.json", grid_key=f"evals/{bid}-samples.png", title=f"{name} {base} NFE {nfe}",
                   tags=[f"dataset:{name}", f"solver:{base}", f"nfe:{nfe}", "baseline"], family="free",
                   checkpoint=f"checkpoints/free-{slug(name)}-{base}-nfe{nfe}-{bid[:12]}",
                   teacher_identity=identity(teacher))


def plan_candidate(cfg: SweepConfig, teacher: TeacherJob, sp, proto: EvalProtocol, base: Optional[EvalJob],
                   seed: int) -> Candidate:
    """Training of ``sp`` with ``seed`` against the dataset's teacher, and the evaluation of its checkpoint; ``base``
    None (``panel.include_base_solvers: false``): no base solver score, the candidate faces the panel only."""
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
    ev = EvalJob(**eval_common(cfg, teacher, sp, proto), id=f"eval-{name}-{eid[:8]}", kind="candidate",
                 checkpoint=ckpt, result_key=f"evals/{eid}.json", grid_key=f"{ckpt}/samples.png",
                 title=f"{dname} {s} NFE {nfe}")
    return Candidate(train=job, eval=ev, base_id=base.id if base is not None else "",
                     base_solver=base.solver if base is not None else sp.base_solver, protocol=proto)


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
    """The base solver's options matching the student's (``amed_core.evaluate.base_options``: AFS, order capped at the
    base's default, DPM-Solver++ flags), the same ``amed sample --predictor`` scores."""
    from amed_core.evaluate import base_options

    return base_options(base, afs=sp.afs, max_order=sp.max_order, predict_x0=getattr(sp, "predict_x0", None),
                        lower_order_final=getattr(sp, "lower_order_final", None),
                        dynamic_thresholding=getattr(sp, "dynamic_thresholding", None))  # the student's (data range)


def _reference(ev: EvalConfig, reference: str, reference_hash: str) -> str:
    """What the samples are compared with (EvalProtocol.reference): a number is comparable only under the same one
    (rmse: the stored reference's spec hash, which pins the model, the seeds, the solver and its points)."""
    if ev.metric == "rmse":
        return f"{reference[:16]};dpmpp3M-logsnr@{ev.reference_steps}-float64;ref:{reference_hash[:16]}"
    if ev.metric == "fid":  # the statistics and the network both define the number
        return f"fid:{ev.fid_stats};inception:{ev.inception_weights}"
    return f"gmm:{reference[:16]}"
