"""The two jobs of a sweep that run as Ray tasks (plain functions; :mod:`flows.cluster.schedule` makes them remote).

Each body loads its inputs from the store, calls amed_core for the work (no math here) and commits its output
atomically: :func:`train_job` a checkpoint (``train.json`` written last, listing the files' sha256),
:func:`eval_job` a score (one PUT). A job retried by Ray starts from scratch and never reads partial output.
"""

from __future__ import annotations

import logging
import os
import time

from flows.cluster.worker import Progress, device, load_dataset_teacher, setup_worker, to_device
from flows.plan import EvalJob, TrainJob
from flows.plan.jobs import RankJob
from flows.storage.checksums import sha256
from flows.storage.runs import RunStore
from flows.storage.urls import read_url

log = logging.getLogger("amed.ray")

__all__ = ["train_job", "eval_job", "rank_job"]


def train_job(job: TrainJob) -> dict:
    """Fit one candidate of its family on stored teacher trajectories and commit its checkpoint to the run store
    (amed: a predictor; gits: a schedule from the fine-grid teacher, JSON only; epd: EPD tables; gs: GS's grid, model
    times and coefficients from the endpoint teacher)."""
    if job.family == "gits":
        return _fit_gits(job)
    if job.family == "epd":
        return _fit_epd(job)
    if job.family == "gs":
        return _fit_gs(job)
    from dataclasses import replace

    from amed_core.amed import SamplerSpec
    from amed_core.amed.checkpoint import checkpoint_files
    from amed_core.amed.train import TrainConfig
    from amed_core.families import amed as fam_amed
    from flows.storage.teachers import TeacherStore

    t_start = time.perf_counter()
    setup_worker(job.torch_threads)
    dev = device()
    store = RunStore(job.store_url, job.storage_options)
    denoiser = load_dataset_teacher(job.dataset).to(dev)
    spec = SamplerSpec.from_dict(job.sampler_spec)
    cfg = TrainConfig.from_dict(job.train)
    tstore = TeacherStore(job.store_url, storage_options=job.storage_options)
    progress = Progress(store, job.id, total=cfg.num_trajectories)
    validation, first = _validation(tstore, job, spec.grid(), dev)

    def batches_for(c):
        return to_device(tstore.iter_batches(job.teacher_hash, spec.grid(), c.batch_size, seed=c.seed, epochs=job.epochs,
                                             num_trajectories=first), dev)

    def callback(p) -> None:
        progress.update(int(p.trajectories), p.loss)

    c0, cpu0 = time.time(), time.process_time()
    cfgs = [replace(cfg, objective=o) for o in (job.objectives or [cfg.objective])]
    result, tried = fam_amed.fit_best(denoiser, spec, cfgs, batches_for, init_r=job.init.get("r"),
                                      validation=validation, callback=callback, device=dev)
    c1 = time.time()
    files, fallback = _or_winner(job, validation, denoiser, result, checkpoint_files(result.predictor.cpu(), spec))
    record = {"id": job.id, "files": {name: sha256(data) for name, data in files.items()},
              "loss_history": [float(sum(b)) for b in result.losses], "train_seconds": float(result.seconds),
              "compute_seconds": float(result.seconds), "updates": int(result.updates),
              "trajectories": int(result.trajectories), "pid": os.getpid(), "attempt": progress.state["attempt"],
              "compute_spans": [[c0, c1]], "cpu_seconds": time.process_time() - cpu0,
              **_fit_record(result, job, tried), **fallback}
    for name, data in files.items():
        store.put(f"{job.checkpoint}/{name}", data)
    store.put_json(f"{job.checkpoint}/train.json", record)  # the commit marker, written last
    progress.finish()
    record["seconds"] = time.perf_counter() - t_start
    return record


def _validation(tstore, job: TrainJob, sigmas, dev):
    """(the held-out ValidationSet or None, how many trajectories training may read or None = all)."""
    if not job.val_trajectories:
        return None, None
    from amed_core.validation import ValidationSet
    from flows.storage.stream import held_out

    spec = tstore.get_spec(job.teacher_hash)
    val = ValidationSet.from_batches(held_out(tstore, job.teacher_hash, sigmas, job.val_trajectories)).to(dev)
    return val, spec.num_trajectories - job.val_trajectories


def _or_winner(job: TrainJob, validation, denoiser, result, files: dict) -> tuple[dict, dict]:
    """A panel start that validation finds no better than its winner commits the winner itself (a free sampler.json;
    issue 21: training moves away from the best free sampler only where validation says it helps). Exact starts need
    no check: their validation's first score is the winner's and ``select="best"`` already keeps it. Returns (the
    files to commit, what the record says)."""
    if not job.init.get("winner_sampler") or job.init.get("exact") or validation is None or not result.validation:
        return files, {}
    from amed_core.families.init import Winner

    w = Winner.from_dict(job.init["winner_sampler"])
    ident = denoiser.identity() if hasattr(denoiser, "identity") else {}
    sampler = w.sampler(ident)
    winner = validation.score(lambda n, lab: sampler(denoiser, n, class_labels=lab).x)
    best = result.validation.get("best")
    info = {"winner_validation": winner}
    if best is None or not best < winner:
        info["fallback"] = True  # the checkpoint is the winner
        return sampler.files(), info
    return files, info


def _fit_record(result, job: TrainJob, tried=None) -> dict:
    """What train.json says about validation, divergence and the start (issue 21)."""
    out = {"diverged": bool(result.diverged), "stopped_early": bool(result.stopped_early),
           "held_out": int(job.val_trajectories)}
    if result.validation:
        out["validation"] = dict(result.validation)
    if tried and len(tried) > 1:
        out["objectives"] = tried
    if job.init:
        out["init"] = {k: v for k, v in job.init.items() if k in ("winner", "from", "exact")}
    return out


def _commit(store: RunStore, job: TrainJob, files: dict, record: dict, t_start: float, progress=None) -> dict:
    record["files"] = {name: sha256(data) for name, data in files.items()}
    for name, data in sorted(files.items(), key=lambda kv: kv[0] == "sampler.json"):
        store.put(f"{job.checkpoint}/{name}", data)
    store.put_json(f"{job.checkpoint}/train.json", record)  # the commit marker, written last
    if progress is not None:
        progress.finish()
    record["seconds"] = time.perf_counter() - t_start
    return record


def _fit_gits(job: TrainJob) -> dict:
    """GITS: the cost matrix from the stored fine-grid teacher (first ``warmup`` trajectories; slopes recomputed),
    the DP, and a sampler.json with the selected sigmas (amed_core.families.gits.fit)."""
    import torch

    from amed_core.families import gits as fam_gits
    from flows.storage.teachers import TeacherStore

    t_start = time.perf_counter()
    setup_worker(job.torch_threads)
    store = RunStore(job.store_url, job.storage_options)
    denoiser = load_dataset_teacher(job.dataset).to("cpu")  # GITS fits on the CPU (the cached teacher may be on a GPU)
    tstore = TeacherStore(job.store_url, storage_options=job.storage_options)
    shard = tstore.read_shard(job.teacher_hash, 0)
    fit = job.fit
    c0, cpu0 = time.time(), time.process_time()
    labels = shard.one_hot_labels() if shard.label_dim else None
    validation = None
    if fit.get("keep") is not None and fit.get("validation"):  # the students' teacher's held-out trajectories
        from amed_core.validation import ValidationSet
        from flows.storage.stream import held_out

        ends = torch.tensor([float(shard.sigmas[0]), float(shard.sigmas[-1])], dtype=torch.float64)
        v = fit["validation"]
        validation = ValidationSet.from_batches(held_out(tstore, v["teacher"], ends, int(v["held_out"]),
                                                         dtype=torch.float64))
    sampler = fam_gits.fit(denoiser, shard.states, shard.sigmas, method=job.solver, nfe=job.nfe, afs=fit.get("afs", False),
                           options=fit.get("options"), metric=fit["metric"], coeff=fit["coeff"], class_labels=labels,
                           warmup=fit["warmup"], keep=fit.get("keep"), keep_afs=fit.get("keep_afs"),
                           validation=validation)
    c1 = time.time()
    record = {"id": job.id, "family": "gits", "loss_history": [], "train_seconds": c1 - c0, "compute_seconds": c1 - c0,
              "updates": 0, "trajectories": int(sampler.spec.fit["warmup_trajectories"]), "pid": os.getpid(),
              "compute_spans": [[c0, c1]], "cpu_seconds": time.process_time() - cpu0, "fit": dict(sampler.spec.fit)}
    return _commit(store, job, sampler.files(), record, t_start)


def _fit_epd(job: TrainJob) -> dict:
    """EPD: tables trained on the stored teacher at the student grid (amed_core.families.epd.fit)."""
    from amed_core.families import epd as fam_epd
    from amed_core.methods.epd import EPDTrainConfig
    from amed_core.schedules import ScheduleSpec
    from flows.storage.teachers import TeacherStore

    t_start = time.perf_counter()
    setup_worker(job.torch_threads)
    dev = device()
    store = RunStore(job.store_url, job.storage_options)
    denoiser = load_dataset_teacher(job.dataset).to(dev)
    train = dict(job.train)
    batch_size = int(train.pop("batch_size"))
    cfg = EPDTrainConfig.from_dict(train)
    if job.sampler_spec.get("sigmas"):  # a panel start: the winner's grid
        import torch

        sigmas = torch.tensor(job.sampler_spec["sigmas"], dtype=torch.float64)
    else:
        sigmas = ScheduleSpec.from_dict(job.sampler_spec["schedule"]).grid(int(job.sampler_spec["num_steps"]))
    tstore = TeacherStore(job.store_url, storage_options=job.storage_options)
    progress = Progress(store, job.id, total=cfg.num_trajectories or 0)
    validation, first = _validation(tstore, job, sigmas, dev)
    batches = tstore.iter_batches(job.teacher_hash, sigmas, batch_size, seed=cfg.seed, epochs=job.epochs,
                                  num_trajectories=first)
    params = None
    if job.init.get("r"):
        from amed_core.methods.epd import params_from_values

        params = params_from_values(job.init["r"], scale_dir=cfg.scale_dir, scale_time=cfg.scale_time, fcn=cfg.fcn).to(dev)
    c0, cpu0 = time.time(), time.process_time()
    sampler, result = fam_epd.fit(denoiser, sigmas, to_device(batches, dev), cfg, nfe=job.nfe,
                                  callback=lambda p: progress.update(int(p.trajectories), p.loss), params=params,
                                  validation=validation)
    c1 = time.time()
    files, fallback = _or_winner(job, validation, denoiser, result, sampler.files())
    record = {"id": job.id, "family": "epd", "loss_history": [float(sum(b)) for b in result.losses],
              "train_seconds": float(result.seconds), "compute_seconds": float(result.seconds),
              "updates": int(result.updates), "trajectories": int(result.trajectories), "pid": os.getpid(),
              "attempt": progress.state["attempt"], "compute_spans": [[c0, c1]], "cpu_seconds": time.process_time() - cpu0,
              **_fit_record(result, job), **fallback}
    return _commit(store, job, files, record, t_start, progress)


def _fit_gs(job: TrainJob) -> dict:
    """GS: every stored (noise, final state) pair of the endpoint teacher, the first train_size trained on and the last
    val_size held out (the reference's split), from the reference's grid or the best panel entry GS can express
    (amed_core.families.gs.fit)."""
    import torch

    from amed_core.families import gs as fam_gs
    from amed_core.methods.gs import GSConfig, GSTrainConfig
    from flows.storage.teachers import TeacherStore

    t_start = time.perf_counter()
    setup_worker(job.torch_threads)
    dev = device()
    store = RunStore(job.store_url, job.storage_options)
    denoiser = load_dataset_teacher(job.dataset).to(dev)
    fit, train = job.fit, dict(job.train)
    train.pop("num_trajectories", None)
    cfg = GSTrainConfig.from_dict(train)
    config = GSConfig.from_dict(fit["config"])
    distance = fam_gs.load_distance(fit["loss"])  # before reading the teacher: a bad loss fails at once
    tstore = TeacherStore(job.store_url, storage_options=job.storage_options)
    shards = [tstore.read_shard(job.teacher_hash, i) for i in sorted(tstore.manifest(job.teacher_hash))]
    noise = torch.cat([sh.noise for sh in shards]).to(torch.float64)
    final = torch.cat([sh.states[-1] for sh in shards]).to(torch.float64)
    labels = torch.cat([sh.one_hot_labels(torch.float64) for sh in shards]) if shards[0].label_dim else None
    n_train, n_val = int(fit["train_size"]), int(fit["val_size"])
    if noise.shape[0] < n_train + n_val:
        raise ValueError(f"the GS teacher holds {noise.shape[0]} trajectories, fewer than train_size + val_size "
                         f"({n_train} + {n_val})")
    tr, va = slice(0, n_train), slice(noise.shape[0] - n_val, noise.shape[0])
    init, source = "reference", None
    if fit["init"] == "panel":
        init, source = gs_panel_init(store, config, fit["panel"])
    progress = Progress(store, job.id, total=cfg.iterations)
    c0, cpu0 = time.time(), time.process_time()
    to = (lambda t: None if t is None else t.to(dev))  # noqa: E731
    sampler, res = fam_gs.fit(denoiser, to(noise[tr]), to(final[tr]), cfg, nfe=job.nfe, config=config, init=init,
                              init_source=source, class_labels=None if labels is None else to(labels[tr]),
                              val=(to(noise[va]), to(final[va]), None if labels is None else to(labels[va])),
                              distance=distance, callback=lambda p: progress.update(p.iteration, p.loss))
    c1 = time.time()
    window = max(1, len(res.losses) // 200)  # the loss curve MLflow shows: at most ~200 window means
    curve = [sum(res.losses[i:i + window]) / len(res.losses[i:i + window]) for i in range(0, len(res.losses), window)]
    record = {"id": job.id, "family": "gs", "loss_history": curve, "train_seconds": float(res.seconds),
              "compute_seconds": float(res.seconds), "updates": int(res.updates), "skipped": int(res.skipped),
              "trajectories": int(res.trajectories), "pid": os.getpid(), "attempt": progress.state["attempt"],
              "compute_spans": [[c0, c1]], "cpu_seconds": time.process_time() - cpu0, "init": sampler.spec.init,
              "val_history": [list(v) for v in res.val_history], "best_val": res.best_val,
              "best_iteration": res.best_iteration, "initial_val": res.initial_val}
    return _commit(store, job, sampler.files(), record, t_start, progress)


def gs_panel_init(store: RunStore, config, entries: list[dict]):
    """(sigmas, source) of the best-scoring panel entry GS can express (N + 1 points inside its end sigmas), read from
    the entries' committed scores; ("reference", why) when none can be. Ties go to the first in plan order, as the
    panel's own choice (flows.report.panel_summaries); ``source["panel_rank"]`` 0 means the panel's best itself."""
    import math

    from amed_core.families.gs import init_params
    from amed_core.schedules import ScheduleSpec

    scored = []
    for k, e in enumerate(entries):
        value = store.get_json(e["result_key"]).get("value") if store.exists(e["result_key"]) else None
        if value is not None and math.isfinite(value):
            scored.append((value, k, e))
    scored.sort(key=lambda v: (v[0], v[1]))
    tried = []
    for rank, (value, _, e) in enumerate(scored):
        sigmas = [float(v) for v in ScheduleSpec.from_dict(e["schedule"]).grid(int(e["num_steps"]))]
        try:
            init_params(config, sigmas)
        except ValueError as err:
            tried.append(f"{e['solver']}: {err}")
            continue
        return sigmas, {"id": e["id"], "solver": e["solver"], "options": e["options"],
                        "schedule": e["schedule"].get("schedule_type"), "value": value, "panel_rank": rank}
    return "reference", {"panel": "no entry GS can express", "tried": tried[:8]}


def eval_job(job: EvalJob) -> dict:
    """Score a checkpoint (``job.checkpoint``) or a training-free solver under the sweep's protocol.

    The scoring is :func:`amed_core.evaluate.score_run` (per-sample seeded noise: sample j uses seed
    ``protocol.seed + j``, so the score never depends on the batch size; candidates and base solvers of one
    dataset see the same noise). This task loads files (checksums checked), the FID inputs (Inception weights
    and reference ``.npz`` via fsspec) and caches partial FID statistics under ``<result_key>.fid-partial``
    so an interrupted evaluation resumes. The score is cached in the run store (``job.result_key``) and
    the first ``grid_samples`` samples are drawn into a PNG.
    """
    import torch

    from amed_core.evaluate import score_run

    t_start = time.perf_counter()
    setup_worker(job.torch_threads)
    dev = device()
    store = RunStore(job.store_url, job.storage_options)
    denoiser = load_dataset_teacher(job.dataset).to(dev)
    proto = job.protocol
    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    if job.kind == "candidate":
        from amed_core.families import sampler_from_files

        sampler = sampler_from_files(store.checkpoint_files(job.checkpoint))
        if hasattr(sampler, "predictor"):
            sampler.predictor.to(dev)
        elif hasattr(sampler, "to"):
            sampler.to(dev)
    else:  # a training-free solver: the free family's sampler (sampler.json, what registers if it wins its panel)
        sampler = free_sampler(job)
        if job.checkpoint:
            store.put(f"{job.checkpoint}/sampler.json", sampler.files()["sampler.json"])

    def run(noise, labels):
        return sampler(denoiser, noise, class_labels=labels)

    reference = None
    if proto.metric == "rmse":  # the stored near-exact reference of these seeds (flows.references), one per teacher
        from flows.references import load_reference

        if not job.reference_spec:
            raise ValueError("metric rmse needs the stored reference (EvalJob.reference_spec); plan the sweep again")
        reference = load_reference(job.reference_spec, job.store_url, job.storage_options, denoiser,
                                   proto.num_samples)

    fid_kw: dict = {}
    partial_key = f"{job.result_key}.fid-partial.safetensors"
    nonfinite_key = f"{job.result_key}.fid-partial.nonfinite"
    if proto.metric == "fid":
        fid_kw = _fid_inputs(job, store, dev, partial_key, nonfinite_key)
    t0 = time.perf_counter()
    c0, cpu0 = time.time(), time.process_time()
    seeds = list(range(proto.seed, proto.seed + proto.num_samples))
    res = score_run(run, denoiser, seeds=seeds, batch_size=proto.batch_size, metric=proto.metric,
                    reference=reference, label_dim=label_dim, device=dev, keep=job.grid_samples, **fid_kw)
    compute = time.perf_counter() - t0
    record = {"id": job.id, "value": float(res.value), "nfe": int(res.nfe), "compute_seconds": compute,
              "compute_spans": [[c0, c0 + compute]], "cpu_seconds": time.process_time() - cpu0,
              "num_samples": int(res.num_samples), "finite": bool(res.finite)}
    if proto.metric == "rmse":
        record["rmse"] = float(res.value)
    if res.per_sample:
        record["per_sample"] = dict(res.per_sample)
    if res.errors is not None:  # every sample's error, for the margin's confidence interval (register stage)
        from safetensors.torch import save

        data = save({"errors": res.errors.to(torch.float64).contiguous()}, metadata={"seed": str(proto.seed)})
        record["errors_key"] = f"{job.result_key}.errors.safetensors"
        store.put(record["errors_key"], data)
        record["errors_sha256"] = sha256(data)
    if proto.metric == "fid" and fid_kw.get("partial") is not None:
        record["resumed_from"] = int(fid_kw["partial"].n)
    if job.grid_samples > 0:
        record["grid_url"] = store.put(job.grid_key, _grid_png(res.samples))
    store.put_json(job.result_key, record)
    if proto.metric == "fid":
        store.delete(partial_key)
        store.delete(nonfinite_key)
    record["seconds"] = time.perf_counter() - t_start
    return record


def free_sampler(job: EvalJob):
    """The free sampler a panel / baseline job describes (solver on its schedule's grid, AFS, options)."""
    from amed_core.families import StaticSampler, StaticSpec
    from amed_core.methods import nfe_for
    from amed_core.schedules import ScheduleSpec

    opts = dict(job.solver_options)
    afs = bool(opts.pop("afs", False))
    sigmas = ScheduleSpec.from_dict(job.schedule).grid(job.num_steps)
    nfe = job.nfe if job.nfe is not None else nfe_for(job.solver, job.num_steps, afs, opts)
    return StaticSampler(StaticSpec("free", job.solver, job.solver, int(nfe), tuple(float(v) for v in sigmas), afs, opts,
                                    job.schedule, job.teacher_identity))


def rank_job(job: RankJob) -> dict:
    """The panel's ranking round at one (dataset, NFE): every entry on the same first ``num_samples`` seeds
    (:func:`amed_core.evaluate.rank_samplers`); the record (values per entry id) is committed at ``result_key``."""
    from amed_core.evaluate import rank_samplers

    t_start = time.perf_counter()
    setup_worker(job.torch_threads)
    dev = device()
    store = RunStore(job.store_url, job.storage_options)
    denoiser = load_dataset_teacher(job.dataset).to(dev)
    c0, cpu0 = time.time(), time.process_time()
    res = rank_samplers({e.id: free_sampler(e) for e in job.entries}, denoiser,
                        seeds=range(job.seed, job.seed + job.num_samples), metric=job.metric, batch_size=job.batch_size,
                        reference_steps=job.reference_steps, label_dim=int(getattr(denoiser, "label_dim", 0) or 0),
                        device=dev)
    compute = time.time() - c0
    record = {"id": job.id, **res, "num_samples": job.num_samples, "compute_seconds": compute,
              "compute_spans": [[c0, c0 + compute]], "cpu_seconds": time.process_time() - cpu0}
    store.put_json(job.result_key, record)
    record["seconds"] = time.perf_counter() - t_start
    return record


def _fid_inputs(job: EvalJob, store: RunStore, dev, partial_key: str, nonfinite_key: str) -> dict:
    """score_run's FID keywords: the Inception network, reference (mu, sigma), the cached partial statistics of
    an interrupted run (if any) and a callback that persists them after every batch."""
    from amed_core.evaluate import FIDSetup
    from amed_core.fid import FIDStats, load_inception, load_reference_stats

    proto = job.protocol
    if not proto.inception_weights or not proto.fid_stats:
        raise ValueError("evaluation.metric 'fid' needs evaluation.inception_weights and evaluation.fid_stats")
    net = load_inception(read_url(proto.inception_weights, "evaluation.inception_weights"), device=dev)
    mu, sigma = load_reference_stats(read_url(proto.fid_stats, "evaluation.fid_stats"))
    partial = None
    if store.exists(partial_key):
        partial = FIDStats.from_bytes(store.get(partial_key))
        log.info("%s: resuming FID from %d of %d samples", job.id, partial.n, proto.num_samples)

    def on_batch(stats, finite):
        if not finite and not store.exists(nonfinite_key):  # marker first: a resumed run stays non-finite
            store.put(nonfinite_key, b"")
        store.put(partial_key, stats.to_bytes())

    return {"fid": FIDSetup(net, mu, sigma), "partial": partial, "partial_finite": not store.exists(nonfinite_key),
            "on_batch": on_batch}


def _grid_png(samples) -> bytes:
    """PNG bytes of a grid of samples in [-1, 1] (``amed_core.evaluate.save_grid_png``, through a temporary file)."""
    import tempfile
    from pathlib import Path

    from amed_core.evaluate import save_grid_png

    with tempfile.TemporaryDirectory(prefix="amed-grid-") as tmp:
        return save_grid_png(samples, Path(tmp, "grid.png")).read_bytes()
