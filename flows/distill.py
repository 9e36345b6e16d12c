"""The ``distill`` flow: teacher -> train -> evaluate -> register over a sweep.

A sweep (``flows.config.SweepConfig``) is datasets x solvers x NFEs x seeds; each combination trains
one AMED predictor (Zhou et al., arXiv 2312.00094) against a teacher shared by its dataset, and is
scored next to its training-free base solver at the same NFE.

- **plan** (``flows.plan.plan_sweep``, before any work): load every teacher, build the SamplerSpecs, the shared
  TeacherSpec per dataset and content-addressed ids for every checkpoint and score; any bad input
  fails the run here.
- **teacher** (one task per dataset): missing shards spread over Ray tasks (each worker loads the model once).
- **train** (one task per combination, tagged dataset/solver/nfe): one Ray task each (``num_gpus`` when
  the cluster has GPUs); the checkpoint is committed with ``train.json`` written last.
- **evaluate** (one task per candidate and per base solver): scores cached in the store. The panel first ranks every
  entry on ``panel.rank_samples`` seeds (one task per (dataset, NFE)); only its best ``panel.finalists`` are scored on
  the full count (successive halving, issue 21). With ``init.mode: panel`` (the default) the ranking's winner is
  where the learned candidates start: the plan is completed after the ranking (``plan_sweep(cfg, winners)``) and the
  trainings, the sweep's critical path, are submitted before the finalists' full-count scores and take free
  slots first.
- **register**: ``runs/<sweep>/results.json`` (list of ``flows.results.CandidateResult``), then
  ``flows.registry.register_sweep`` unless ``register_models`` is false; Prefect table + markdown artifacts.

Reruns skip finished work: every task first looks for its committed output in the store (the truth),
and its Prefect cache key includes that output's hash, so a stale cache can never stand in for a
missing output. A retried task never reads partial output: teacher shards count only once in the
manifest, checkpoints only once ``train.json`` lists their sha256, scores are written in one PUT.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional, Union

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.cluster.jobs import eval_job, rank_job, train_job
from flows.cluster.schedule import PREFETCHED, SLOTS, run_one
from flows.cluster.session import ray_session
from flows.cluster.teacher import start_teacher
from flows.config import ComputeConfig, SweepConfig, load_sweep
from flows.env import freeze_gc_at_exit
from flows.plan import EvalJob, SweepPlan, TeacherJob, TrainJob, plan_sweep, slug
from flows.plan.init import choose
from flows.plan.jobs import RankJob
from flows.references import reference_records
from flows.report import MarginIntervals, final_lines, panel_summaries, publish_artifacts, shown_uri
from flows.results import CandidateResult, champion_rows, flag_diverged, results_table
from flows.storage.checksums import json_digest, sha256
from flows.storage.credentials import redact
from flows.storage.runs import RunStore
from flows.storage.teachers import TeacherStore

__all__ = ["distill", "plan_sweep", "teacher_stage", "train_stage", "evaluate_stage", "register_stage"]

log = logging.getLogger("amed.distill")


# ---------------------------------------------------------------------------------------------
# Cache keys: "done" means the committed output is in the store; the key carries its hash.

def _store(job: Union[TrainJob, EvalJob]) -> RunStore:
    return RunStore(job.store_url, job.storage_options)


def _teacher_key(context, parameters) -> Optional[str]:
    t: TeacherJob = parameters["teacher"]
    if PREFETCHED.has_teacher(t.spec_hash):  # this run's own work, started before the flow: take it, never a record
        return None  # (an earlier run's record for the same shard hashes, in another store, would claim it)
    try:
        store = TeacherStore(t.store_url, storage_options=t.storage_options)
        entries = store.manifest(t.spec_hash)
    except Exception:  # noqa: BLE001 - no cache when the store cannot tell
        return None
    if len(entries) < t.num_shards:
        return None
    return f"amed-teacher-{t.spec_hash[:32]}-{json_digest(sorted((i, e['sha256']) for i, e in entries.items()))}"


def _train_key(context, parameters) -> Optional[str]:
    job: TrainJob = parameters["job"]
    return _done_key("train", job.id, job, f"{job.checkpoint}/train.json")


def _eval_key(context, parameters) -> Optional[str]:
    job: EvalJob = parameters["job"]
    if PREFETCHED.has_eval(job.id):  # started by `amed distill` before the flow: this run's work (see _teacher_key)
        return None
    return _done_key("eval", job.id, job, job.result_key)


def _rank_key(context, parameters) -> Optional[str]:
    job: RankJob = parameters["job"]
    if PREFETCHED.has_eval(job.id):
        return None
    return _done_key("rank", job.id, job, job.result_key)


def _done_key(stage: str, job_id: str, job, marker: str) -> Optional[str]:
    """The stage's cache key when its committed output ``marker`` is in the store (the key carries its hash)."""
    try:
        data = _store(job).get(marker)
    except Exception:  # noqa: BLE001 - not done (or unreadable): run it
        return None
    return f"amed-{stage}-{job_id}-{sha256(data)[:16]}"


# ---------------------------------------------------------------------------------------------
# Stages.

_NO_RETRY = (ValueError, TypeError, NameError, AttributeError, KeyError, ImportError, NotImplementedError)


def _retry_infra_only(task, task_run, state) -> bool:
    """Retry lost workers, network and storage hiccups; not bugs or bad input (they would fail the same way)."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - classifying the failure
        cause = getattr(e, "cause", None) or e  # RayTaskError wraps the task's own exception
        return not isinstance(cause, _NO_RETRY) and not isinstance(e, _NO_RETRY)
    return True


@task(name="teacher", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_infra_only, cache_key_fn=_teacher_key, persist_result=True,
      result_serializer="json")
def teacher_stage(teacher: TeacherJob, compute: ComputeConfig) -> dict:
    """Generate the dataset's missing teacher shards as Ray tasks (each worker loads the model once)."""
    from amed_core.teacher import TeacherSpec

    logger = get_run_logger()
    t0 = time.perf_counter()
    store = TeacherStore(teacher.store_url, storage_options=teacher.storage_options)
    spec = TeacherSpec.from_json(teacher.spec_json)
    store.put_spec(spec)
    pre = PREFETCHED.take_teacher(spec.spec_hash)  # started by `amed distill` before the API was up
    missing = pre.missing if pre is not None else store.missing_shards(spec)
    out = {"spec_hash": spec.spec_hash, "shards": spec.num_shards, "shards_written": len(missing),
           "compute_seconds": 0.0, "nfe": 0}

    def total_nfe() -> int:  # denoiser calls the whole stored teacher cost (whoever generated it)
        return int(sum(e["nfe"] * e["num_samples"] for e in store.manifest(spec.spec_hash).values()))

    if not missing:
        out["nfe_total"] = total_nfe()
        logger.info("teacher %s for %s: all %d shards in the store, nothing to do", spec.spec_hash[:12],
                    teacher.name, spec.num_shards)
        out["seconds"] = time.perf_counter() - t0
        return out
    logger.info("teacher %s for %s: generating %d of %d shards (%d trajectories, %d grid points, solver %s, M=%d)",
                spec.spec_hash[:12], teacher.name, len(missing), spec.num_shards, spec.num_trajectories,
                len(spec.teacher_grid()), spec.solver, spec.sub_steps)

    def on_shard(rec: dict, k: int, n: int) -> None:
        how = "committed" if rec["nfe"] else "adopted (generated by another writer)"
        logger.info("teacher %s: shard %d %s (%d/%d, %.1f s)", teacher.name, rec["index"], how, k, n, rec["seconds"])

    if pre is None:
        pre = start_teacher(teacher.dataset, teacher.spec_json, missing, store_url=teacher.store_url,
                            storage_options=teacher.storage_options, compute=compute)
    recs = pre.finish(on_shard)
    still = store.missing_shards(spec)
    if still:
        raise RuntimeError(f"teacher {spec.spec_hash[:12]}: shards {still} still missing after generation")
    generated = sum(1 for r in recs if r["nfe"])  # a shard another sweep generated (or a dead writer left) is adopted
    out.update(shards_written=generated, shards_adopted=len(recs) - generated,
               compute_seconds=sum(r["compute_seconds"] for r in recs), nfe=sum(r["nfe"] for r in recs),
               seconds=time.perf_counter() - t0, compute_spans=[s for r in recs for s in r["compute_spans"]],
               cpu_seconds=sum(r.get("cpu_seconds", 0.0) for r in recs), nfe_total=total_nfe())
    return out


@task(name="train", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_infra_only, cache_key_fn=_train_key, persist_result=True,
      result_serializer="json")
def train_stage(job: TrainJob, compute: ComputeConfig) -> dict:
    """Train one predictor as a Ray task (GPU when the cluster has one); skip when its checkpoint is committed."""
    logger = get_run_logger()
    store = _store(job)
    rec = store.committed_checkpoint(job.checkpoint)
    if rec is not None:
        logger.info("train %s: checkpoint committed in the store, skipping", job.name)
        return {**rec, "skipped": True, "seconds": 0.0}
    with SLOTS.slot(compute.max_parallel, priority=1):  # the critical path: the next free slot is a training's
        logger.info("train %s: %d trajectories x %d epoch(s), batch %d", job.name, job.train["num_trajectories"]
                    // job.epochs, job.epochs, job.train["batch_size"])
        rec = run_one(train_job, job, compute=compute, gpu=True, logger=logger, store=store)
    if store.committed_checkpoint(job.checkpoint) is None:
        raise RuntimeError(f"train {job.name}: the checkpoint was not committed")
    logger.info("train %s: done in %.1f s (final loss %.4g)%s", job.name, rec["seconds"],
                rec["loss_history"][-1] if rec["loss_history"] else float("nan"), _validation_line(rec))
    return {**rec, "skipped": False}


def _validation_line(rec: dict) -> str:
    v = rec.get("validation") or {}
    if not v:
        return " DIVERGED" if rec.get("diverged") else ""
    return (f"; validation {v.get('first'):.4g} -> {v.get('best'):.4g} (kept update {v.get('best_updates')})"
            + (" DIVERGED" if rec.get("diverged") else "") + (", stopped early" if rec.get("stopped_early") else ""))


@task(name="rank", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_infra_only, cache_key_fn=_rank_key,
      persist_result=True, result_serializer="json")
def rank_stage(job: RankJob, compute: ComputeConfig) -> dict:
    """Rank one (dataset, NFE)'s panel on the first seeds as a Ray task; skip when its record is in the store."""
    logger = get_run_logger()
    rec = _stored_or_run(rank_job, job, compute, logger, "rank")
    best = sorted(rec["values"].items(), key=lambda kv: kv[1])[:3]
    logger.info("rank %s: %d entries on %d samples (%s), best %s", job.id, len(rec["values"]), job.num_samples,
                rec["metric"], ", ".join(f"{k.split('-nfe')[0].rsplit('-', 1)[-1]}={v:.4g}" for k, v in best))
    return rec


def _stored_or_run(fn, job, compute: ComputeConfig, logger, label: str) -> dict:
    """A scoring job's record: the one in the store (``skipped``) unless ``amed distill`` already started the job on
    Ray, else ``fn(job)`` as a Ray task in a flow slot."""
    store = _store(job)
    if not PREFETCHED.has_eval(job.id) and store.exists(job.result_key):
        logger.info("%s %s: in the store, skipping", label, job.id)
        return {**store.get_json(job.result_key), "skipped": True, "seconds": 0.0}
    with SLOTS.slot(compute.max_parallel):
        rec = run_one(fn, job, compute=compute, gpu=True, logger=logger, store=store, ref=PREFETCHED.take_eval(job.id))
    return {**rec, "skipped": False}


@task(name="evaluate", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_infra_only, cache_key_fn=_eval_key,
      persist_result=True, result_serializer="json")
def evaluate_stage(job: EvalJob, compute: ComputeConfig) -> dict:
    """Score a candidate checkpoint or a base solver as a Ray task; skip when its score is in the store."""
    logger = get_run_logger()
    rec = _stored_or_run(eval_job, job, compute, logger, "evaluate")
    if rec["skipped"]:
        return rec
    logger.info("evaluate %s: %s = %.5g (NFE %d, %d samples)", job.id, job.protocol.metric, rec["value"],
                rec["nfe"], rec["num_samples"])
    return {**rec, "skipped": False}


@task(name="register", retries=1, retry_delay_seconds=1)
def register_stage(cfg_json: dict, plan: SweepPlan, trained: dict, scores: dict, teachers: dict,
                   ranked: Optional[list] = None) -> dict:
    """Write runs/<sweep>/results.json, register winners in MLflow (register_models), publish artifacts."""
    logger = get_run_logger()
    cfg = SweepConfig.model_validate(cfg_json)
    store = RunStore(plan.store_url, cfg.storage_options)
    panels = panel_summaries(plan, scores, ranked)
    interval = MarginIntervals(store)  # margin intervals over noise seeds (paired bootstrap over samples)
    jobs = {b.id: b for b in plan.baselines}

    def options_of(job: EvalJob) -> dict:  # what names a training-free sampler (flows.results.entry_name)
        return {"schedule": job.schedule.get("schedule_type"), "rho": job.schedule.get("rho"),
                "options": dict(job.solver_options)}

    results: list[CandidateResult] = []
    for c in plan.candidates:
        tr, sc = trained[c.id], scores[c.eval.id]
        base = scores[c.base_id] if c.base_id else {}  # none: panel.include_base_solvers false
        teacher = teachers[c.train.dataset.name]
        if c.family in ("gits", "gs"):  # their own teachers (roles gits / gs)
            teacher = teachers.get(f"{c.train.dataset.name}:{c.family}", teacher)
        artifacts = {}
        if sc.get("grid_url"):
            artifacts["samples.png"] = sc["grid_url"]
        if base.get("grid_url"):
            artifacts["base_samples.png"] = base["grid_url"]
        best = _panel_best(panels.get((c.train.dataset.name, c.train.nfe), {}).get("best") or {}, plan, store)
        results.append(CandidateResult(
            dataset=c.train.dataset.name, solver=c.train.solver, base_solver=c.base_solver, nfe=c.train.nfe,
            base_options=options_of(jobs[c.base_id]) if c.base_id else {},
            seed=c.train.seed, checkpoint_url=store.url_of(c.train.checkpoint), protocol=c.protocol,
            value=sc["value"], base_value=base.get("value"), rmse=sc.get("rmse"), train_seconds=tr.get("train_seconds", 0.0),
            teacher_nfe=int(teacher.get("nfe_total", 0)), loss_history=tr.get("loss_history", []),
            artifacts=artifacts, sampler_spec=c.train.sampler_spec, family=c.family,
            denoiser_calls=int(sc.get("nfe", c.train.nfe)), teacher_id=c.teacher_id,
            panel_best=best, panel_value=best.get("value"), per_sample=sc.get("per_sample", {}),
            margin_ci=interval(sc, scores.get(best.get("id"), {})) if best else None,
            training={k: tr[k] for k in ("validation", "diverged", "stopped_early", "init", "objectives", "held_out",
                                         "fallback", "winner_validation") if k in tr}))
    flag_diverged(results)
    for (dname, nfe), p in panels.items():  # the panel's winner is a candidate too (family free, no weights)
        best = p["best"]
        if not best:
            continue
        job = jobs[best["id"]]
        sc = scores[job.id]
        artifacts = {"samples.png": sc["grid_url"]} if sc.get("grid_url") else {}
        results.append(CandidateResult(
            dataset=dname, solver=job.solver, base_solver=job.solver, base_options=options_of(job), nfe=nfe, seed=0,
            checkpoint_url=store.url_of(job.checkpoint), protocol=p["protocol"], value=sc["value"],
            base_value=sc["value"], rmse=sc.get("rmse"), artifacts=artifacts, family="free",
            denoiser_calls=int(sc.get("nfe", nfe)), teacher_id=p["teacher_id"], panel_best=best,
            panel_value=best["value"], per_sample=sc.get("per_sample", {}),
            sampler_spec={"solver": job.solver, "options": job.solver_options, "schedule": job.schedule}))
    references = reference_records(plan)  # metric rmse: the stored reference and its convergence (N vs 2N - 1)
    for ref in references:
        logger.info("reference of %s: %s", ref["dataset"], ref)
    payload = {"sweep": cfg.name, "config": redact(cfg_json), "results": [r.model_dump(mode="json") for r in results],
               "panels": [{**{k: v for k, v in p.items() if k != "protocol"}, "dataset": d, "nfe": n}
                          for (d, n), p in panels.items()], "references": references}
    results_url = store.put_json(f"runs/{cfg.name}/results.json", payload)
    logger.info("results: %s", results_url)
    champions: dict[str, str] = {}
    if cfg.register_models:  # register_models false: results.json is the record
        import ray

        from flows.registry import register_sweep
        from flows.registry.checks import RayChecks

        checks = RayChecks(cfg.compute) if ray.is_initialized() else None  # else in this process
        champions = dict(register_sweep(cfg, results, checks=checks) or {})
        for name, uri in champions.items():
            logger.info("champion %s -> %s", name, uri)
    publish_artifacts(cfg, results, scores, plan, results_url, champions)
    return {"results_url": results_url, "champions": champions, "results": payload["results"],
            "panels": payload["panels"], "references": references}


def _panel_best(best: dict, plan: SweepPlan, store: RunStore) -> dict:
    """The panel's best entry with its checkpoint's URL (the free sampler.json its evaluation wrote), for the
    champion's side-by-side picture on the model page (flows/registry/story.py)."""
    job = next((b for b in plan.baselines if b.id == best.get("id")), None)
    return {**best, "checkpoint_url": store.url_of(job.checkpoint)} if job is not None and job.checkpoint else best


def _warm_driver(cfg: SweepConfig) -> threading.Thread:
    """While Ray computes, import what the flow's last steps need, so they start warm: matplotlib (the quality plot of
    the report; ~0.9 s of CPU on the 2-core VM, measured with py-spy, that otherwise sat on the flow's critical path at
    its very end) and, with registration on, MLflow (imported, its tables created)."""

    def warm() -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception as e:  # noqa: BLE001 - the report says what is wrong when it draws
            log.debug("matplotlib warm-up skipped: %s", e)
        if not cfg.register_models:
            return
        try:
            import mlflow

            from flows.registry import resolve_tracking_uri

            from flows.registry.tracking import ensure_local_registry

            uri = resolve_tracking_uri(config=cfg)
            ensure_local_registry(uri)  # a local database is built in a temporary file, moved into place complete
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - the register stage reports real problems
            log.debug("registry warm-up skipped: %s", e)

    t = threading.Thread(target=warm, name="driver-warmup", daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------------------------------
# The flow.

def _preflight(cfg: SweepConfig, logger) -> SweepConfig:
    """Fix the sweep's registry and store (flows.registry.tracking.PRECEDENCE) and prove the registry answers."""
    from flows.registry.tracking import check_registry, redact_uri, resolve_endpoints

    cfg = load_sweep(cfg, **resolve_endpoints(cfg))
    if cfg.register_models:
        logger.info("registry: %s", check_registry(cfg.mlflow_tracking_uri))
    else:
        logger.info("registry: none (register_models: false; %s unused)", redact_uri(cfg.mlflow_tracking_uri))
    from flows.storage.preflight import check_store

    logger.info("store: %s", check_store(cfg.store_url, cfg.storage_options))  # reachable and writable, or one line
    return cfg


def _panel_first(cfg: SweepConfig, plan: SweepPlan, compute: ComputeConfig, logger):
    """The panel's ranking round (and, without one, under init panel, every entry's full score), then, under init
    panel, the plan completed with the candidates that start from the winners. Returns (plan, {"records": RankJob id
    -> record, "choice": [{dataset, nfe, metric, num_samples, values}]}, {EvalJob id -> record scored in full})."""
    records, early = {}, {}
    if plan.rank:
        futs = {r.id: rank_stage.with_options(tags=[f"dataset:{r.dataset.name}", f"nfe:{r.nfe}", "stage:rank"],
                                              task_run_name=r.id).submit(r, compute) for r in plan.rank}
        records = {k: _this_run(f) for k, f in futs.items()}
    elif plan.pending_init:  # no halving: the winners need every entry's full score first
        futs = {b.id: evaluate_stage.with_options(tags=b.tags + ["stage:evaluate"], task_run_name=b.id
                                                  ).submit(b, compute) for b in plan.baselines}
        early = {k: _this_run(f) for k, f in futs.items()}
    choice = choose(plan, cfg.panel.finalists, records, early)
    if plan.pending_init:
        for (dname, nfe), job in sorted(choice.winners.items()):
            logger.info("panel start %s NFE %d: %s %s (the learned candidates start here)", dname, nfe, job.solver,
                        {k: v for k, v in job.schedule.items() if k in ("schedule_type", "rho")})
        plan = plan_sweep(cfg, winners=choice.winners)
        logger.info("planned from the panel's winners: %d teacher(s), %d candidate(s)", len(plan.teachers),
                    len(plan.candidates))
    ranking = [{"dataset": d, "nfe": n, **v} for (d, n), v in choice.ranked.items()]  # JSON-able task parameter
    return plan, {"records": records, "choice": ranking}, early


def _this_run(future) -> dict:
    """A stage's result as work of this run: a result Prefect served from its cache (an earlier, maybe killed, run
    computed it) counts as skipped, so a rerun's summary never claims the earlier run's shards, training or seconds."""
    rec = future.result()
    if getattr(future.state, "name", None) == "Cached":
        rec = {**rec, "skipped": True, "shards_written": 0, "compute_seconds": 0.0, "cpu_seconds": 0.0,
               "compute_spans": []}
    return rec


@flow(name="distill", task_runner=ThreadPoolTaskRunner(max_workers=32), log_prints=True)
def distill(sweep: Union[SweepConfig, dict, str] = "configs/quickstart.yaml") -> dict:
    """Distill AMED samplers for every dataset x solver x NFE x seed of a sweep (arXiv 2312.00094).

    Args:
        sweep: The sweep: the path of a YAML file in the flow's working directory (the repository root, e.g.
            `configs/deploy-smoke.yaml`), or an object with the same fields (flows/config/schema.py SweepConfig).
            Registry and store: the sweep's `mlflow_tracking_uri` / `store_url`, else the worker's
            MLFLOW_TRACKING_URI / AMED_STORE_URL, else SQLite and a folder under ./amed-runs/<name>.
    """
    logger = get_run_logger()
    t_flow, t_epoch = time.perf_counter(), time.time()
    freeze_gc_at_exit()  # the flow process (a deployment's, or amed distill) exits ~0.7 s sooner (flows/env.py)
    cfg = _preflight(load_sweep(sweep), logger)  # before any compute: an unreachable registry fails here
    plan = plan_sweep(cfg)
    compute = cfg.compute
    logger.info("sweep %s: %d dataset(s), %d teacher(s), %d candidate(s), %d training-free run(s); store %s", cfg.name,
                len({t.name for t in plan.teachers}), len(plan.teachers), len(plan.candidates), len(plan.baselines),
                plan.store_url)
    with ray_session(cfg.compute) as ray_info:
        logger.info("Ray at %s (%s, %.1f s): %s", ray_info.address, "started here" if ray_info.started_here else
                    "existing", ray_info.seconds, {k: v for k, v in ray_info.resources.items() if "node" not in k})
        plan, ranked, early = _panel_first(cfg, plan, compute, logger)
        t_fut = {t.key: teacher_stage.with_options(tags=[f"dataset:{t.name}", "stage:teacher"],
                                                   task_run_name=f"teacher-{slug(t.key)}").submit(t, compute)
                 for t in plan.teachers}
        t_by_hash = {t.spec_hash: t_fut[t.key] for t in plan.teachers}
        tr_fut, ev_fut = {}, {}
        def submit_train(c, extra=()):
            deps = [t_by_hash[c.train.teacher_hash], *extra]
            vt = (c.train.fit.get("validation") or {}).get("teacher")  # GITS validates on the students' teacher
            if vt in t_by_hash and vt != c.train.teacher_hash:
                deps.append(t_by_hash[vt])
            tr_fut[c.id] = train_stage.with_options(tags=c.train.tags + ["stage:train"], task_run_name=f"train-{c.name}"
                                                    ).submit(c.train, compute, wait_for=deps)

        waits_for_panel = [c for c in plan.candidates if c.train.fit.get("panel")]
        for c in plan.candidates:  # trainings first: the critical path
            if not c.train.fit.get("panel"):
                submit_train(c)
        full = set(choose(plan, cfg.panel.finalists, ranked.get("records"), early).full)
        b_fut = {b.id: evaluate_stage.with_options(tags=b.tags + ["stage:evaluate"], task_run_name=b.id
                                                   ).submit(b, compute) for b in plan.baselines
                 if b.id in full and b.id not in early}
        for c in waits_for_panel:  # a panel-initialised GS waits for its NFE's panel scores (those scored in full)
            submit_train(c, [b_fut[e["id"]] for e in c.train.fit["panel"] if e["id"] in b_fut])
        for c in plan.candidates:
            ev_fut[c.id] = evaluate_stage.with_options(tags=c.train.tags + ["stage:evaluate"],
                                                       task_run_name=f"eval-{c.name}").submit(
                c.eval, compute, wait_for=[tr_fut[c.id]])
        warm = _warm_driver(cfg)  # after Ray's start and the submissions: its imports would slow both (the GIL)
        teachers = {n: _this_run(f) for n, f in t_fut.items()}
        trained = {k: _this_run(f) for k, f in tr_fut.items()}
        scores = {**early, **{b: _this_run(f) for b, f in b_fut.items()}}
        scores.update({c.eval.id: _this_run(ev_fut[c.id]) for c in plan.candidates})
        warm.join()
        # inside the Ray session: the teacher-dependent checks of registration run on the workers
        reg = register_stage(cfg.model_dump(mode="json"), plan, trained, scores, teachers, ranked.get("choice"))
    wall = time.perf_counter() - t_flow
    work = {"teacher_shards_written": sum(t["shards_written"] for t in teachers.values()),
            "trained": sum(not r.get("skipped") for r in trained.values()),
            "evaluated": sum(not r.get("skipped") for r in scores.values())}
    cpu_s = sum(t.get("cpu_seconds", 0.0) for t in teachers.values()) + sum(
        r.get("cpu_seconds", 0.0) for r in list(trained.values()) + list(scores.values()) if not r.get("skipped"))
    compute_s = {"teacher": sum(t.get("compute_seconds", 0.0) for t in teachers.values()),
                 "train": sum(r.get("compute_seconds", 0.0) for r in trained.values() if not r.get("skipped")),
                 "evaluate": sum(r.get("compute_seconds", 0.0) for r in scores.values() if not r.get("skipped"))}
    spans = [s for t in teachers.values() for s in t.get("compute_spans", [])]
    spans += [s for r in ranked.get("records", {}).values() if not r.get("skipped") for s in r.get("compute_spans", [])]
    spans += [s for r in list(trained.values()) + list(scores.values()) if not r.get("skipped")
              for s in r.get("compute_spans", [])]
    final = [CandidateResult.model_validate(r) for r in reg["results"]]
    table, best = results_table(final), champion_rows(final)
    logger.info("sweep %s done in %.1f s (work: %s)", cfg.name, wall, work)
    final_lines(logger, cfg, table, reg)
    return {"sweep": cfg.name, "store_url": plan.store_url, "results_url": reg["results_url"],
            "tracking_uri": shown_uri(cfg.mlflow_tracking_uri) if cfg.register_models else None,
            "champions": reg["champions"], "results": reg["results"], "table": table, "best": best,
            "panels": reg.get("panels", []), "references": reg.get("references", []),
            "work": work, "compute_seconds": compute_s, "compute_cpu_seconds": cpu_s, "compute_spans": spans, "ray_start_seconds": ray_info.seconds,
            "wall_seconds": wall, "flow_started": t_epoch}
