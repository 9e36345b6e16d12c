"""Planning panel starts (issue 21, items 3 and 6): the panel's ranking round (successive halving) and the learned
candidates that start from its winner at each (dataset, NFE).

- :func:`plan_rank`: one :class:`RankJob` per (dataset, NFE) scoring every panel entry on the first
  ``min(panel.rank_samples, evaluation.num_samples)`` evaluation seeds in one task (None where ranking is off:
  ``rank_samples`` 0, every entry then gets its own full-count evaluation).
- :func:`choose`: from the ranking (or the full scores), the winner of every slot and the entries worth a full-count
  score (the ``panel.finalists`` best, plus every candidate's base solver).
- :func:`plan_panel_starts`: with the winners known, the students' teacher (at the winners' grids, and EPD's), an
  AMED candidate per (NFE, seed) that reproduces the winner before training (``amed_core.families.init``), EPD
  candidates on the winner's grid, GITS on the winner's solver with the winner's points in its fine grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from flows.config import DatasetConfig, SweepConfig
from flows.plan.common import students_teacher
from flows.plan.jobs import Candidate, EvalJob, RankJob, SweepPlan, TeacherJob, TrainJob, slug
from flows.results import EvalProtocol
from flows.storage.checksums import json_digest

__all__ = ["plan_rank", "choose", "winner_of", "plan_panel_starts", "PanelStarts", "Choice"]


def plan_rank(cfg: SweepConfig, d: DatasetConfig, nfe: int, entries: list[EvalJob], proto: EvalProtocol) -> Optional[RankJob]:
    """The ranking round of one slot, or None when ranking is off (``panel.rank_samples`` 0)."""
    ev = cfg.evaluation
    n = min(cfg.panel.rank_samples, ev.num_samples)
    if not n or not entries:
        return None
    rid = json_digest({"entries": [e.id for e in entries], "num_samples": n, "protocol": proto.hash,
                       "reference_steps": ev.reference_steps})
    first = entries[0]
    return RankJob(id=f"rank-{slug(d.name)}-nfe{nfe}-{rid[:8]}", store_url=first.store_url,
                   storage_options=first.storage_options, torch_threads=first.torch_threads, dataset=first.dataset,
                   nfe=nfe, num_samples=n, seed=ev.seed, metric=ev.metric, batch_size=ev.batch_size,
                   reference_steps=ev.reference_steps, protocol_hash=proto.hash, entries=entries,
                   result_key=f"evals/rank-{rid}.json")


@dataclass
class Choice:
    """What the ranking decided: the winning entry per (dataset, NFE) and the baseline ids to score in full."""

    winners: dict = field(default_factory=dict)      # (dataset, nfe) -> EvalJob
    full: list = field(default_factory=list)         # baseline ids, plan order
    ranked: dict = field(default_factory=dict)       # (dataset, nfe) -> {"metric", "num_samples", "values": {id: v}}


def choose(plan: SweepPlan, finalists: int, rank_scores: Optional[dict] = None, scores: Optional[dict] = None) -> Choice:
    """Winners and full-count entries. With a ranking round (``rank_scores``: RankJob id -> its record) the
    ``finalists`` best entries of each slot are scored in full and the best ranked entry wins; without one, every
    entry is scored in full and the winner is the best full score (``scores``: EvalJob id -> record; none yet: no
    winner).
    Ties go to the entry planned first; an entry that failed ranks last."""
    jobs = {b.id: b for b in plan.baselines}
    out = Choice()
    keep: set[str] = {c.base_id for c in plan.candidates}
    for slot in plan.panels:
        rank = next((r for r in plan.rank if r.dataset.name == slot.dataset and r.nfe == slot.nfe), None)
        if rank is not None and rank_scores is not None and rank.id in rank_scores:
            values = rank_scores[rank.id]["values"]
            out.ranked[(slot.dataset, slot.nfe)] = {"metric": rank_scores[rank.id].get("metric"),
                                                     "num_samples": rank.num_samples, "values": dict(values)}
            order = sorted(slot.entries, key=lambda i: (_finite(values.get(i)), slot.entries.index(i)))
            keep.update(order[:finalists])
        else:  # every entry in full; the winner from full scores, when there are any yet
            keep.update(slot.entries)
            order = [] if not scores else sorted(slot.entries, key=lambda i: (_finite((scores.get(i) or {}).get("value")),
                                                                               slot.entries.index(i)))
        if order:
            out.winners[(slot.dataset, slot.nfe)] = jobs[order[0]]
    out.full = [b.id for b in plan.baselines if b.id in keep]
    return out


def _finite(v) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else math.inf


def winner_of(job: EvalJob):
    """The :class:`amed_core.families.init.Winner` a panel job describes (its grid from its schedule)."""
    from amed_core.families.init import Winner
    from amed_core.schedules import ScheduleSpec

    sigmas = [float(v) for v in ScheduleSpec.from_dict(job.schedule).grid(job.num_steps)]
    opts = dict(job.solver_options)
    return Winner(job.solver, tuple(sigmas), bool(opts.pop("afs", False)), opts, dict(job.schedule))


@dataclass
class PanelStarts:
    teachers: list = field(default_factory=list)
    candidates: list = field(default_factory=list)


def plan_panel_starts(cfg: SweepConfig, d: DatasetConfig, ds: DatasetConfig, den, winners: dict, proto: EvalProtocol,
                      tid: str, store_url: str, extra_grids=(), reference_spec: str | None = None) -> PanelStarts:
    """Teachers and candidates of dataset ``d`` that start from its panel winners (see the module docstring); the
    students' teacher also stores ``extra_grids`` (the recipe students' of init mode both). ``reference_spec``: the
    dataset's stored rmse reference (flows.plan.sweep.plan_reference), which every evaluate job scores against."""
    from amed_core.families.init import amed_init, epd_init
    from amed_core.schedules import ScheduleSpec
    from amed_core.teacher import StudentGrid
    from flows.plan.families import plan_gits_candidate, plan_gits_teacher

    out = PanelStarts()
    starts = {nfe: winners[(d.name, nfe)] for nfe in cfg.nfes if (d.name, nfe) in winners}
    grids, amed, epd = list(extra_grids), {}, {}
    for nfe, job in starts.items():
        w = winner_of(job)
        sched = ScheduleSpec.from_dict(job.schedule)
        grids.append(StudentGrid(sched, job.num_steps))
        try:
            amed[nfe] = (w, amed_init(w, single_step_at=cfg.init.single_step_at))
        except ValueError:
            pass  # a winner no AMED plugin starts from: no AMED candidate at this NFE
        for s in cfg.families.epd.solvers:
            e = epd_init(w, nfe, cfg.families.epd.num_points)
            epd[(s, nfe)] = e
            if e.sigmas != tuple(w.sigmas[::2]):
                grids.append(StudentGrid(sched, len(e.sigmas)))
    if not grids:
        return out
    teacher = students_teacher(cfg, d, ds, den, grids, store_url).model_copy(update={"reference_spec": reference_spec})
    out.teachers.append(teacher)
    for nfe, (w, init) in amed.items():
        for seed in cfg.seeds:
            out.candidates.append(_amed_candidate(cfg, teacher, den, starts[nfe], w, init, proto, seed, tid))
    for (s, nfe), e in epd.items():
        for seed in cfg.seeds:
            out.candidates.append(_epd_candidate(cfg, teacher, s, nfe, starts[nfe], e, proto, seed, tid))
    if cfg.families.gits.solvers:
        from amed_core.methods import method_names

        bases = {m.split("+", 1)[1] for m in method_names("gits")}
        gits_grids = [StudentGrid(ScheduleSpec.from_dict(j.schedule), j.num_steps) for j in starts.values()]
        gt = plan_gits_teacher(cfg, d, teacher, den, store_url, extra_grids=gits_grids)
        out.teachers.append(gt)
        held = cfg.train.val_count(cfg.teacher.num_trajectories)
        val = {"teacher": teacher.spec_hash, "held_out": held} if held else None
        for nfe, job in starts.items():
            if job.solver not in bases:
                continue
            planned = plan_gits_candidate(cfg, gt, den, job.solver, nfe, proto, "", tid, start=job, validation=val)
            if planned is not None:
                out.candidates.append(planned[0])
    return out


def _eval_job(cfg: SweepConfig, start: EvalJob, name: str, cid: str, ckpt: str, family: str, title: str,
              proto: EvalProtocol) -> EvalJob:
    """The candidate's evaluate job: the winner's protocol, schedule and stored reference (metric rmse)."""
    from flows.plan.families import candidate_eval

    return candidate_eval(start, cid, proto, name, ckpt, family, title)


def _train_common(cfg: SweepConfig, teacher: TeacherJob, solver: str) -> dict:
    held = cfg.train.val_count(cfg.teacher.num_trajectories)
    return {"store_url": teacher.store_url, "storage_options": teacher.storage_options,
            "torch_threads": cfg.compute.torch_threads, "dataset": teacher.dataset, "teacher_hash": teacher.spec_hash,
            "val_trajectories": held}


def _amed_candidate(cfg: SweepConfig, teacher: TeacherJob, den, start: EvalJob, w, init, proto: EvalProtocol,
                    seed: int, tid: str) -> Candidate:
    from amed_core.amed import PredictorConfig
    from amed_core.amed.train import TrainConfig
    from amed_core.families.init import amed_spec
    from amed_core.schedules import ScheduleSpec

    s, nfe, dname = init.solver, init.nfe, teacher.name
    sc, tc = cfg.sampler_for(s), cfg.train
    pc = PredictorConfig(scale_dir=sc.scale_dir, scale_time=sc.scale_time)
    if tc.hidden_dim:
        pc = replace(pc, hidden_dim=tc.hidden_dim)
    spec = amed_spec(init, predictor=pc, denoiser=den, schedule=ScheduleSpec.from_dict(start.schedule))
    held = cfg.train.val_count(cfg.teacher.num_trajectories)
    train = TrainConfig(num_trajectories=(cfg.teacher.num_trajectories - held) * tc.epochs, batch_size=tc.batch_size,
                        lr=cfg.init.lr, seed=seed, loss_weighting=tc.loss_weighting, tail_weight=tc.tail_weight,
                        loss_target=tc.loss_target, val_every=tc.val_every, patience=tc.patience).to_dict()
    start_doc = {"winner": start.id, "r": list(init.r), "exact": init.exact, "from": start.solver,
                 "winner_sampler": w.to_dict()}
    cid = json_digest({"teacher": teacher.spec_hash, "spec": spec.to_dict(), "train": train, "epochs": tc.epochs,
                       "init": start_doc, "objectives": tc.objectives, "held_out": held})
    name = f"{slug(dname)}-{slug(s)}-nfe{nfe}-seed{seed}"
    ckpt = f"checkpoints/{name}-{cid[:12]}"
    job = TrainJob(id=f"{name}-{cid[:8]}", name=name, **_train_common(cfg, teacher, s), solver=s, nfe=nfe, seed=seed,
                   sampler_spec=spec.to_dict(), train=train, epochs=tc.epochs, checkpoint=ckpt, init=start_doc,
                   objectives=list(tc.objectives),
                   tags=[f"dataset:{dname}", f"solver:{s}", f"nfe:{nfe}", f"seed:{seed}", "init:panel"])
    ev = _eval_job(cfg, start, name, cid, ckpt, "amed", f"{dname} {s} NFE {nfe} (from {start.solver})", proto)
    return Candidate(train=job, eval=ev, base_id=start.id, base_solver=start.solver, protocol=proto, family="amed",
                     teacher_id=tid)


def _epd_candidate(cfg: SweepConfig, teacher: TeacherJob, s: str, nfe: int, start: EvalJob, e, proto: EvalProtocol,
                   seed: int, tid: str) -> Candidate:
    from amed_core.methods.epd import EPDTrainConfig

    f, dname = cfg.families.epd, teacher.name
    held = cfg.train.val_count(cfg.teacher.num_trajectories)
    tc = EPDTrainConfig(solver=s, num_points=f.num_points, scale_dir=f.scale_dir, scale_time=f.scale_time, afs=e.afs,
                        max_order=f.max_order, lr=f.lr, seed=seed, loss_weighting=f.loss_weighting,
                        num_trajectories=(cfg.teacher.num_trajectories - held) * f.epochs,
                        val_every=cfg.train.val_every, patience=cfg.train.patience).to_dict()
    sp = {"kind": "epd", "solver": s, "nfe": nfe, "num_steps": len(e.sigmas), "afs": e.afs, "sigmas": list(e.sigmas),
          "schedule": dict(start.schedule), "max_order": f.max_order if s == "epd+ipndm" else None}
    start_doc = {"winner": start.id, "r": [list(r) for r in e.r], "exact": False, "from": start.solver,
                 "winner_sampler": winner_of(start).to_dict()}
    cid = json_digest({"teacher": teacher.spec_hash, "spec": sp, "train": tc, "epochs": f.epochs,
                       "batch_size": f.batch_size, "init": start_doc, "held_out": held})
    name = f"{slug(dname)}-{slug(s)}-nfe{nfe}-seed{seed}"
    ckpt = f"checkpoints/{name}-{cid[:12]}"
    job = TrainJob(id=f"{name}-{cid[:8]}", name=name, **_train_common(cfg, teacher, s), solver=s, nfe=nfe, seed=seed,
                   sampler_spec=sp, train={**tc, "batch_size": f.batch_size}, epochs=f.epochs, checkpoint=ckpt,
                   family="epd", init=start_doc,
                   tags=[f"dataset:{dname}", f"solver:{s}", f"nfe:{nfe}", f"seed:{seed}", "family:epd", "init:panel"])
    ev = _eval_job(cfg, start, name, cid, ckpt, "epd", f"{dname} {s} NFE {nfe} (from {start.solver})", proto)
    return Candidate(train=job, eval=ev, base_id=start.id, base_solver=start.solver, protocol=proto, family="epd",
                     teacher_id=tid)
