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
from flows.storage.checksums import sha256
from flows.storage.runs import RunStore
from flows.storage.urls import read_url

log = logging.getLogger("amed.ray")

__all__ = ["train_job", "eval_job"]


def train_job(job: TrainJob) -> dict:
    """Fit one candidate of its family on stored teacher trajectories and commit its checkpoint to the run store
    (amed: a predictor; gits: a schedule from the fine-grid teacher, JSON only; epd: EPD tables)."""
    if job.family == "gits":
        return _fit_gits(job)
    if job.family == "epd":
        return _fit_epd(job)
    from amed_core.amed import AMEDPredictor, SamplerSpec
    from amed_core.amed.checkpoint import checkpoint_files
    from amed_core.amed.train import TrainConfig, train_amed
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
    batches = tstore.iter_batches(job.teacher_hash, spec.grid(), cfg.batch_size, seed=cfg.seed, epochs=job.epochs)

    def callback(p) -> None:
        progress.update(int(p.trajectories), p.loss)

    c0, cpu0 = time.time(), time.process_time()
    predictor = AMEDPredictor(spec.predictor, seed=cfg.seed).to(dev)
    result = train_amed(denoiser, spec, cfg, to_device(batches, dev), callback=callback, predictor=predictor)
    c1 = time.time()
    files = checkpoint_files(result.predictor.cpu(), spec)
    record = {"id": job.id, "files": {name: sha256(data) for name, data in files.items()},
              "loss_history": [float(sum(b)) for b in result.losses], "train_seconds": float(result.seconds),
              "compute_seconds": float(result.seconds), "updates": int(result.updates),
              "trajectories": int(result.trajectories), "pid": os.getpid(), "attempt": progress.state["attempt"],
              "compute_spans": [[c0, c1]], "cpu_seconds": time.process_time() - cpu0}
    for name, data in files.items():
        store.put(f"{job.checkpoint}/{name}", data)
    store.put_json(f"{job.checkpoint}/train.json", record)  # the commit marker, written last
    progress.finish()
    record["seconds"] = time.perf_counter() - t_start
    return record


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
    sampler = fam_gits.fit(denoiser, shard.states, shard.sigmas, method=job.solver, nfe=job.nfe, afs=fit.get("afs", False),
                           options=fit.get("options"), metric=fit["metric"], coeff=fit["coeff"], class_labels=labels,
                           warmup=fit["warmup"])
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
    sigmas = ScheduleSpec.from_dict(job.sampler_spec["schedule"]).grid(int(job.sampler_spec["num_steps"]))
    tstore = TeacherStore(job.store_url, storage_options=job.storage_options)
    progress = Progress(store, job.id, total=cfg.num_trajectories or 0)
    batches = tstore.iter_batches(job.teacher_hash, sigmas, batch_size, seed=cfg.seed, epochs=job.epochs)
    c0, cpu0 = time.time(), time.process_time()
    sampler, result = fam_epd.fit(denoiser, sigmas, to_device(batches, dev), cfg, nfe=job.nfe,
                                  callback=lambda p: progress.update(int(p.trajectories), p.loss))
    c1 = time.time()
    record = {"id": job.id, "family": "epd", "loss_history": [float(sum(b)) for b in result.losses],
              "train_seconds": float(result.seconds), "compute_seconds": float(result.seconds),
              "updates": int(result.updates), "trajectories": int(result.trajectories), "pid": os.getpid(),
              "attempt": progress.state["attempt"], "compute_spans": [[c0, c1]], "cpu_seconds": time.process_time() - cpu0}
    return _commit(store, job, sampler.files(), record, t_start, progress)


def eval_job(job: EvalJob) -> dict:
    """Score a checkpoint (``job.checkpoint``) or a training-free solver under the sweep's protocol.

    The scoring is :func:`amed_core.evaluate.score_run` (per-sample seeded noise: sample j uses seed
    ``protocol.seed + j``, so the score never depends on the batch size; candidates and base solvers of one
    dataset see the same noise). This task loads files (checksums checked), the FID inputs (Inception weights
    and reference ``.npz`` via fsspec) and caches partial FID statistics under ``<result_key>.fid-partial``
    so an interrupted evaluation resumes. The score is cached in the run store (``job.result_key``) and
    the first ``grid_samples`` samples are drawn into a PNG.
    """
    from amed_core.evaluate import score_run
    from amed_core.schedules import ScheduleSpec
    from amed_core.methods import nfe_for

    import torch

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
        from amed_core.families import StaticSampler, StaticSpec

        opts = dict(job.solver_options)
        afs = bool(opts.pop("afs", False))
        sigmas = ScheduleSpec.from_dict(job.schedule).grid(job.num_steps)
        nfe = job.nfe if job.nfe is not None else nfe_for(job.solver, job.num_steps, afs, opts)
        sampler = StaticSampler(StaticSpec("free", job.solver, job.solver, int(nfe), tuple(float(v) for v in sigmas),
                                           afs, opts, job.schedule, job.teacher_identity))
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
