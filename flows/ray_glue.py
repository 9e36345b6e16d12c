"""Ray glue for the distill flow: a local or remote Ray, teacher actors, training and evaluation tasks.

The Prefect tasks in :mod:`flows.distill` call the functions here; Ray workers never import Prefect.
Every remote body calls amed_core for the work (no math here) and the store for its inputs and outputs:

- :func:`ray_session` starts a local Ray on loopback (``num_cpus``, ``object_store_memory``) and stops it
  afterwards, or connects to ``compute.ray_address`` / ``$RAY_ADDRESS`` and leaves that cluster running.
- :class:`TeacherWorker` is an actor that loads the teacher model once and generates many shards.
- :func:`train_job` / :func:`eval_job` run one training or evaluation; :func:`run_jobs` spreads them over
  the cluster with at most ``max_parallel`` in flight, ``num_gpus`` only when the cluster has GPUs, and
  Ray retries when a worker dies (a retried job starts from scratch; outputs are committed atomically,
  so nothing partial is ever read).
- Jobs report progress (pid, attempt, step, loss) to ``progress/<job>.json`` in the store; the flow
  logs it while it waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

log = logging.getLogger("amed.ray")

__all__ = [
    "ray_session",
    "cluster_has_gpus",
    "task_options",
    "RunStore",
    "TeacherWorker",
    "generate_teacher",
    "start_teacher",
    "prefetch",
    "train_job",
    "eval_job",
    "run_one",
    "run_jobs",
]


# ---------------------------------------------------------------------------------------------
# Ray lifecycle.

@dataclass
class RaySessionInfo:
    address: str
    started_here: bool
    seconds: float
    resources: dict


@contextlib.contextmanager
def ray_session(compute, *, log_to_driver: bool = False) -> Iterator[RaySessionInfo]:
    """Use the running Ray, connect to ``compute.ray_address`` / ``$RAY_ADDRESS``, or start a local one.

    A local Ray listens on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, see docs STACK notes) and
    is shut down on exit; a connected cluster is left running.
    """
    from flows.env import apply_safe_defaults

    apply_safe_defaults()
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        yield RaySessionInfo(_address(), False, 0.0, dict(ray.cluster_resources()))
        return
    address = compute.ray_address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": {"OMP_NUM_THREADS": str(compute.torch_threads)}}
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=env)
    else:
        num_cpus = compute.num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray (127.0.0.1, %d CPUs, object store %.1f GB)", num_cpus,
                 compute.object_store_memory / 1e9)
        ray.init(num_cpus=num_cpus, object_store_memory=compute.object_store_memory, include_dashboard=False,
                 log_to_driver=log_to_driver, runtime_env=env, configure_logging=False)
    info = RaySessionInfo(_address(), True, time.perf_counter() - t0, dict(ray.cluster_resources()))
    try:
        yield info
    finally:
        if info.started_here:
            ray.shutdown()


def _import_work_modules() -> int:
    import amed_core.amed.train  # noqa: F401  (torch, solvers, AMED)
    import flows.store  # noqa: F401  (fsspec, safetensors)

    return os.getpid()


def prewarm(n: int) -> list:
    """Fire-and-forget: make ``n`` idle Ray workers import torch/amed_core while the caller does other startup."""
    import ray

    fn = ray.remote(num_cpus=1)(_import_work_modules)
    return [fn.remote() for _ in range(max(1, n))]


def _address() -> str:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - informational only
        return "?"


def cluster_has_gpus() -> bool:
    """True when the cluster has GPUs (asking for num_gpus on a GPU-less cluster would wait forever)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def task_options(compute, *, gpu: bool = True) -> dict:
    """Ray options of one job: CPUs, GPUs only where the cluster has them, retries when a worker dies."""
    opts: dict[str, Any] = {"num_cpus": compute.cpus_per_task, "max_retries": compute.task_retries,
                            "retry_exceptions": False}
    if gpu and compute.gpus_per_task > 0 and cluster_has_gpus():
        opts["num_gpus"] = compute.gpus_per_task
    return opts


# ---------------------------------------------------------------------------------------------
# The run store: checkpoints, evaluations, progress (teachers live in flows.store.TeacherStore).

class RunStore:
    """fsspec folder for everything but teacher shards; writes are atomic (temp + move, or one PUT).

    Layout: ``checkpoints/<id>/{predictor.safetensors, sampler.json, train.json}`` (``train.json`` is
    written last: its presence, with the sha256 of the other files, is what "done" means),
    ``evals/<id>.json``, ``progress/<job>.json``, ``runs/<sweep>/...``.
    """

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        import fsspec

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def url_of(self, key: str) -> str:
        return self.fs.unstrip_protocol(self.path(key)) if not self.local else self.path(key)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def put(self, key: str, data: bytes) -> str:
        """Write atomically: readers see the old object or the whole new one, never a prefix."""
        path = self.path(key)
        parent = path.rsplit("/", 1)[0]
        if self.local:
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return self.url_of(key)

    def put_json(self, key: str, obj: Any) -> str:
        return self.put(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self.path(key), recursive=True)

    def list(self, key: str) -> list[str]:
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(key), detail=False))
        except FileNotFoundError:
            return []


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Worker-side helpers.

def _setup_worker(torch_threads: int) -> None:
    import torch

    torch.set_num_threads(torch_threads)


def _device():
    """The GPU Ray assigned to this task/actor, else the CPU."""
    import ray
    import torch

    if not ray.is_initialized():  # called in-process (tests, CLI): ray.get_gpu_ids() would start a local Ray
        return torch.device("cpu")
    try:
        gpus = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - not inside Ray
        gpus = []
    return torch.device("cuda") if gpus and torch.cuda.is_available() else torch.device("cpu")


def _to_device(batches, device):
    from amed_core.teacher import TeacherBatch

    for b in batches:
        yield b if device.type == "cpu" else TeacherBatch(
            noise=b.noise.to(device), states=b.states.to(device),
            class_labels=None if b.class_labels is None else b.class_labels.to(device))


def _load_teacher(dataset: dict):
    from amed_core.denoisers import load_teacher

    kw = dict(dataset.get("options") or {})
    if dataset.get("weights_url"):
        kw["weights_url"] = dataset["weights_url"]
    return load_teacher(dataset["teacher"], **kw)


class _Progress:
    """Throttled progress reports of a running job (pid, started, step, total, loss) to the store."""

    def __init__(self, store: RunStore, job_id: str, total: int, every_s: float = 1.0):
        self.store, self.key, self.total, self.every_s = store, f"progress/{job_id}.json", total, every_s
        prev = store.get_json(self.key) if store.exists(self.key) else {}
        self.state = {"job": job_id, "pid": os.getpid(), "attempt": int(prev.get("attempt", 0)) + 1,
                      "step": 0, "total": total, "loss": None, "done": False, "started": time.time()}
        self._last = 0.0
        self.write()

    def write(self) -> None:
        self.state["updated"] = time.time()
        self.store.put_json(self.key, self.state)
        self._last = time.perf_counter()

    def update(self, step: int, loss: Optional[float] = None, *, force: bool = False) -> None:
        self.state["step"] = step
        if loss is not None:
            self.state["loss"] = float(loss)
        if force or time.perf_counter() - self._last >= self.every_s:
            self.write()

    def finish(self) -> None:
        self.state["done"] = True
        self.state["step"] = self.total
        self.write()


# ---------------------------------------------------------------------------------------------
# Teacher: actors that load the model once and generate many shards.

class TeacherWorker:
    """Loads one teacher model and writes shards of a TeacherSpec to the teacher store."""

    def __init__(self, dataset: dict, store_url: str, storage_options: dict, torch_threads: int = 1):
        _setup_worker(torch_threads)
        self.device = _device()
        self.denoiser = _load_teacher(dataset).to(self.device)
        self.store_url, self.storage_options = store_url, storage_options

    def pid(self) -> int:
        return os.getpid()

    def generate(self, spec_json: str, index: int) -> dict:
        """Generate shard ``index`` and commit it (write-once object, then its manifest entry)."""
        from amed_core.teacher import TeacherSpec, generate_shard
        from flows.store import TeacherStore

        spec = TeacherSpec.from_json(spec_json)
        store = TeacherStore(self.store_url, storage_options=self.storage_options)
        t0 = time.perf_counter()
        entry = store.adopt_shard(spec, index)  # a killed writer may have left a complete object behind
        compute, nfe, span, cpu = 0.0, 0, [], 0.0
        if entry is None:
            c0, cpu0 = time.time(), time.process_time()
            shard = generate_shard(self.denoiser, spec, index, device=self.device)
            cpu = time.process_time() - cpu0
            compute = time.time() - c0
            span = [[c0, c0 + compute]]
            nfe = shard.nfe * shard.num_samples
            entry = store.commit_shard(spec, shard)
        return {"index": index, "compute_seconds": compute, "seconds": time.perf_counter() - t0, "nfe": nfe,
                "entry": entry, "pid": os.getpid(), "compute_spans": span, "cpu_seconds": cpu}


@dataclass
class TeacherRun:
    """Shards in flight on teacher actors (round robin; equal-size shards keep the actors equally busy)."""

    actors: list
    refs: list
    missing: list

    def finish(self, on_shard: Callable[[dict, int, int], None]) -> list[dict]:
        """Wait for every shard (reporting each as it lands), then release the actors."""
        import ray

        out, pending = [], list(self.refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                rec = ray.get(ready[0])
                out.append(rec)
                on_shard(rec, len(out), len(self.refs))
        finally:
            for a in self.actors:
                ray.kill(a)
        return out


def start_teacher(dataset: dict, spec_json: str, missing: Sequence[int], *, store_url: str, storage_options: dict,
                  compute) -> TeacherRun:
    """Start generating the missing shards on ``compute.teacher_actors`` actors (each loads the model once)."""
    import ray

    n_actors = max(1, min(compute.teacher_actors, len(missing)))
    opts = task_options(compute)
    actor_opts = {k: v for k, v in opts.items() if k in ("num_cpus", "num_gpus")}
    actor_cls = ray.remote(TeacherWorker).options(max_restarts=compute.task_retries,
                                                   max_task_retries=compute.task_retries, **actor_opts)
    actors = [actor_cls.remote(dataset, store_url, storage_options, compute.torch_threads) for _ in range(n_actors)]
    refs = [actors[k % n_actors].generate.remote(spec_json, idx) for k, idx in enumerate(missing)]
    return TeacherRun(actors, refs, list(missing))


def generate_teacher(dataset: dict, spec_json: str, missing: Sequence[int], *, store_url: str,
                     storage_options: dict, compute, on_shard: Callable[[dict, int, int], None]) -> list[dict]:
    """Generate the missing shards on teacher actors and wait for them."""
    return start_teacher(dataset, spec_json, missing, store_url=store_url, storage_options=storage_options,
                         compute=compute).finish(on_shard)


# Work started before the Prefect API is up (see :func:`prefetch`); the flow's tasks adopt it by key.
PREFETCH: dict[tuple[str, str], Any] = {}


def prefetch(plan: dict, compute) -> int:
    """Start the work that needs nothing upstream (teacher shards, base-solver scores) on Ray right away.

    ``amed distill`` calls this while Prefect's ephemeral API is still starting; the flow's teacher and
    evaluate tasks then wait for these results instead of submitting the same work again. Returns the
    number of jobs started.
    """
    from amed_core.teacher import TeacherSpec
    from flows.store import TeacherStore

    n = 0
    for t in plan["teachers"]:
        store = TeacherStore(plan["store_url"], storage_options=plan["storage_options"])
        spec = TeacherSpec.from_json(t["spec_json"])
        store.put_spec(spec)
        missing = store.missing_shards(spec)
        if missing:
            PREFETCH[("teacher", t["spec_hash"])] = start_teacher(
                t["dataset"], t["spec_json"], missing, store_url=plan["store_url"],
                storage_options=plan["storage_options"], compute=compute)
            n += len(missing)
    remote = _remote(eval_job, compute, gpu=True)
    for b in plan["baselines"]:
        if not RunStore(b["store_url"], b["storage_options"]).exists(b["result_key"]):
            PREFETCH[("eval", b["id"])] = remote.remote(b)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Training and evaluation jobs (plain functions; run_jobs makes them Ray tasks).

def train_job(job: dict) -> dict:
    """Train one predictor on stored teacher trajectories and commit its checkpoint to the run store.

    job (built by flows.distill.plan_sweep): id, dataset (DatasetConfig JSON), sampler_spec (SamplerSpec
    JSON), train (amed_core TrainConfig fields), teacher_hash, epochs, store_url, storage_options,
    checkpoint (key in the run store), torch_threads.
    """
    from amed_core.amed import SamplerSpec
    from amed_core.amed.checkpoint import checkpoint_files
    from amed_core.amed.train import TrainConfig, train_amed
    from flows.store import TeacherStore

    t_start = time.perf_counter()
    from amed_core.amed import AMEDPredictor

    _setup_worker(job["torch_threads"])
    device = _device()
    store = RunStore(job["store_url"], job["storage_options"])
    denoiser = _load_teacher(job["dataset"]).to(device)
    spec = SamplerSpec.from_dict(job["sampler_spec"])
    cfg = TrainConfig.from_dict(job["train"])
    tstore = TeacherStore(job["store_url"], storage_options=job["storage_options"])
    progress = _Progress(store, job["id"], total=cfg.num_trajectories)
    batches = tstore.iter_batches(job["teacher_hash"], spec.grid(), cfg.batch_size, seed=cfg.seed,
                                  epochs=job["epochs"])

    def callback(p) -> None:
        progress.update(int(p.trajectories), p.loss)

    c0, cpu0 = time.time(), time.process_time()
    predictor = AMEDPredictor(spec.predictor, seed=cfg.seed).to(device)
    result = train_amed(denoiser, spec, cfg, _to_device(batches, device), callback=callback, predictor=predictor)
    c1 = time.time()
    files = checkpoint_files(result.predictor.cpu(), spec)
    record = {"id": job["id"], "files": {name: sha256(data) for name, data in files.items()},
              "loss_history": [float(sum(b)) for b in result.losses], "train_seconds": float(result.seconds),
              "compute_seconds": float(result.seconds), "updates": int(result.updates),
              "trajectories": int(result.trajectories), "pid": os.getpid(), "attempt": progress.state["attempt"],
              "compute_spans": [[c0, c1]], "cpu_seconds": time.process_time() - cpu0}
    for name, data in files.items():
        store.put(f"{job['checkpoint']}/{name}", data)
    store.put_json(f"{job['checkpoint']}/train.json", record)  # the commit marker, written last
    progress.finish()
    record["seconds"] = time.perf_counter() - t_start
    return record


def eval_job(job: dict) -> dict:
    """Score a checkpoint (``job["checkpoint"]``) or a training-free solver under the sweep's protocol.

    The scoring is :func:`amed_core.evaluate.score_run` (per-sample seeded noise: sample j uses seed
    ``protocol.seed + j``, so the score never depends on the batch size; candidates and base solvers of one
    dataset see the same noise). This task loads files (checksums checked), the FID inputs (Inception weights
    and reference ``.npz`` via fsspec) and caches partial FID statistics under ``<result_key>.fid-partial``
    so an interrupted evaluation resumes. The score is cached in the run store (``job["result_key"]``) and
    the first ``grid_samples`` samples are drawn into a PNG.
    """
    import torch

    from amed_core.evaluate import score_run
    from amed_core.schedules import ScheduleSpec
    from amed_core.solvers import solve

    t_start = time.perf_counter()
    _setup_worker(job["torch_threads"])
    device = _device()
    store = RunStore(job["store_url"], job["storage_options"])
    denoiser = _load_teacher(job["dataset"]).to(device)
    proto = job["protocol"]
    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    if job.get("checkpoint"):
        from amed_core.amed.checkpoint import sampler_from_files

        committed = store.get_json(f"{job['checkpoint']}/train.json")  # only committed checkpoints are read
        files = {}
        for name, digest in committed["files"].items():
            files[name] = store.get(f"{job['checkpoint']}/{name}")
            if sha256(files[name]) != digest:
                raise RuntimeError(f"{job['checkpoint']}/{name}: sha256 differs from train.json (corrupted)")
        sampler = sampler_from_files(files)
        sampler.predictor.to(device)

        def run(noise, labels):
            return sampler(denoiser, noise, class_labels=labels)
    else:
        sigmas = ScheduleSpec.from_dict(job["schedule"]).grid(job["num_steps"])

        def run(noise, labels):
            return solve(job["solver"], denoiser, noise * sigmas[0], sigmas, class_labels=labels, **job["solver_options"])

    reference = None
    if proto["metric"] == "rmse":
        ref_sigmas = ScheduleSpec.from_dict(job["schedule"]).grid(proto["reference_steps"])

        def reference(noise, labels):
            return solve(job["reference_solver"], denoiser, noise * ref_sigmas[0], ref_sigmas, class_labels=labels)

    fid_kw: dict = {}
    partial_key = f"{job['result_key']}.fid-partial.safetensors"
    nonfinite_key = f"{job['result_key']}.fid-partial.nonfinite"
    if proto["metric"] == "fid":
        fid_kw = _fid_inputs(job, store, device, partial_key, nonfinite_key)
    t0 = time.perf_counter()
    c0, cpu0 = time.time(), time.process_time()
    seeds = list(range(proto["seed"], proto["seed"] + proto["num_samples"]))
    res = score_run(run, denoiser, seeds=seeds, batch_size=proto["batch_size"], metric=proto["metric"],
                    reference=reference, label_dim=label_dim, device=device, keep=job["grid_samples"], **fid_kw)
    compute = time.perf_counter() - t0
    record = {"id": job["id"], "value": float(res.value), "nfe": int(res.nfe), "compute_seconds": compute,
              "compute_spans": [[c0, c0 + compute]], "cpu_seconds": time.process_time() - cpu0,
              "num_samples": int(res.num_samples), "finite": bool(res.finite)}
    if proto["metric"] == "rmse":
        record["rmse"] = float(res.value)
    if proto["metric"] == "fid" and fid_kw.get("partial") is not None:
        record["resumed_from"] = int(fid_kw["partial"].n)
    if job["grid_samples"] > 0:
        record["grid_url"] = store.put(job["grid_key"], _grid_png(res.samples, job.get("title", "")))
    store.put_json(job["result_key"], record)
    if proto["metric"] == "fid":
        store.delete(partial_key)
        store.delete(nonfinite_key)
    record["seconds"] = time.perf_counter() - t_start
    return record


def _read_url(url: str, what: str) -> bytes:
    """Bytes of a local path or fsspec URL (the user's own copies; nothing is downloaded from the internet)."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what}: nothing at {url!r}; give the path or URL of your copy") from None


def _fid_inputs(job: dict, store: RunStore, device, partial_key: str, nonfinite_key: str) -> dict:
    """score_run's FID keywords: the Inception network, reference (mu, sigma), the cached partial statistics of
    an interrupted run (if any) and a callback that persists them after every batch."""
    from amed_core.evaluate import FIDSetup
    from amed_core.fid import FIDStats, load_inception, load_reference_stats

    proto = job["protocol"]
    if not proto.get("inception_weights") or not proto.get("fid_stats"):
        raise ValueError("evaluation.metric 'fid' needs evaluation.inception_weights and evaluation.fid_stats")
    net = load_inception(_read_url(proto["inception_weights"], "evaluation.inception_weights"), device=device)
    mu, sigma = load_reference_stats(_read_url(proto["fid_stats"], "evaluation.fid_stats"))
    partial = None
    if store.exists(partial_key):
        partial = FIDStats.from_bytes(store.get(partial_key))
        log.info("%s: resuming FID from %d of %d samples", job["id"], partial.n, proto["num_samples"])

    def on_batch(stats, finite):
        if not finite and not store.exists(nonfinite_key):  # marker first: a resumed run stays non-finite
            store.put(nonfinite_key, b"")
        store.put(partial_key, stats.to_bytes())

    return {"fid": FIDSetup(net, mu, sigma), "partial": partial, "partial_finite": not store.exists(nonfinite_key),
            "on_batch": on_batch}


def _grid_png(x, title: str = "") -> bytes:
    """A square grid of images (B, C, H, W) in [-1, 1] as PNG bytes (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x)
    n = x.shape[0]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    C, H, W = x.shape[1:]
    canvas = np.ones((rows * (H + 1) + 1, cols * (W + 1) + 1, 3 if C == 3 else 1), dtype=np.float32)
    img = np.clip((x + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = img[k]
    fig, ax = plt.subplots(figsize=(3, 3 * canvas.shape[0] / canvas.shape[1] + 0.3), dpi=100)
    ax.imshow(canvas[..., 0] if canvas.shape[-1] == 1 else canvas, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Scheduling.

_REMOTES: dict = {}


def _remote(fn: Callable[[dict], dict], compute, *, gpu: bool):
    """``ray.remote(fn)`` with this compute's options, made once per (function, options)."""
    import ray

    opts = task_options(compute, gpu=gpu)
    key = (fn.__name__, json.dumps(opts, sort_keys=True))
    if key not in _REMOTES:
        _REMOTES[key] = ray.remote(fn).options(**opts)
    return _REMOTES[key]


def run_one(fn: Callable[[dict], dict], job: dict, *, compute, gpu: bool, logger: Optional[logging.Logger] = None,
            store: Optional[RunStore] = None, poll_s: float = 1.0, report_s: float = 10.0) -> dict:
    """Run ``fn(job)`` as one Ray task and wait, logging the progress the job reports to the store.

    Ray re-runs the task (``compute.task_retries`` times) when its worker process dies.
    """
    import ray

    logger = logger or log
    ref = PREFETCH.pop(("eval" if fn is eval_job else fn.__name__, job["id"]), None)
    if ref is None:
        ref = _remote(fn, compute, gpu=gpu).remote(job)
    last = time.perf_counter()
    while True:
        ready, _ = ray.wait([ref], timeout=poll_s)
        if ready:
            return ray.get(ref)
        if store is not None and time.perf_counter() - last >= report_s:
            last = time.perf_counter()
            pkey = f"progress/{job['id']}.json"
            if store.exists(pkey):
                p = store.get_json(pkey)
                logger.info("%s: %s/%s trajectories, loss %s (attempt %s)", job["id"], p.get("step"), p.get("total"),
                            p.get("loss"), p.get("attempt"))


def run_jobs(fn: Callable[[dict], dict], jobs: Sequence[dict], *, compute, gpu: bool, label: str,
             store: Optional[RunStore] = None, logger: Optional[logging.Logger] = None,
             poll_s: float = 2.0) -> list[dict]:
    """Run ``fn(job)`` as Ray tasks, at most ``compute.max_parallel`` in flight; results in job order.

    While waiting it logs each finished job and the progress the running ones report.
    """
    import ray

    logger = logger or log
    if not jobs:
        return []
    remote = ray.remote(fn).options(**task_options(compute, gpu=gpu))
    pending = list(enumerate(jobs))
    inflight: dict[Any, int] = {}
    results: dict[int, dict] = {}
    last_report = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < compute.max_parallel:
            i, job = pending.pop(0)
            inflight[remote.remote(job)] = i
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=poll_s)
        for ref in ready:
            i = inflight.pop(ref)
            results[i] = ray.get(ref)
            logger.info("%s %d/%d done: %s (%.1f s)", label, len(results), len(jobs), jobs[i]["id"],
                        results[i].get("seconds", 0.0))
        if store is not None and not ready and time.perf_counter() - last_report >= 10 * poll_s:
            last_report = time.perf_counter()
            for i in inflight.values():
                key = f"progress/{jobs[i]['id']}.json"
                if store.exists(key):
                    p = store.get_json(key)
                    logger.info("%s %s: step %s/%s loss %s (attempt %s)", label, jobs[i]["id"], p.get("step"),
                                p.get("total"), p.get("loss"), p.get("attempt"))
    return [results[i] for i in range(len(jobs))]
