"""The Ray session of a sweep: a local Ray on loopback, or a connection to a running cluster.

:func:`ray_session` starts a local Ray on 127.0.0.1 (``num_cpus``, ``object_store_memory``) and stops it
afterwards, or connects to ``compute.ray_address`` / ``$RAY_ADDRESS`` and leaves that cluster running.
:func:`task_options` is what every job asks of the cluster (GPUs only where it has them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

log = logging.getLogger("amed.ray")

__all__ = ["RaySessionInfo", "ray_session", "prewarm", "cluster_has_gpus", "task_options"]


@dataclass
class RaySessionInfo:
    address: str
    started_here: bool
    seconds: float
    resources: dict


@contextlib.contextmanager
def ray_session(compute, *, log_to_driver: bool = False) -> Iterator[RaySessionInfo]:
    """Use the running Ray, connect to ``compute.ray_address`` / ``$RAY_ADDRESS``, or start a local one.

    A local Ray listens on 127.0.0.1 only (``flows.env.SAFE_DEFAULTS``) and
    is shut down on exit; a connected cluster is left running.
    """
    from flows.env import apply_safe_defaults, import_thread_unsafe_modules

    apply_safe_defaults()
    import_thread_unsafe_modules()  # Ray's first submission imports pydantic.v1.fields, a Prefect thread pydantic.v1
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        yield RaySessionInfo(_address(), False, 0.0, dict(ray.cluster_resources()))
        return
    address = compute.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=_runtime_env())
    else:
        num_cpus = compute.num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray (127.0.0.1, %d CPUs, object store %.1f GB)", num_cpus,
                 compute.object_store_memory / 1e9)
        # address="local": always a new instance (address=None would join a cluster someone started with `ray start`)
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=compute.object_store_memory, include_dashboard=False,
                 log_to_driver=log_to_driver, configure_logging=False)
    info = RaySessionInfo(_address(), not address, time.perf_counter() - t0, dict(ray.cluster_resources()))
    try:
        yield info
    finally:
        if not address:
            _kill_local_monitor()
        ray.shutdown()  # stops the local instance; only disconnects this driver from a cluster


def _runtime_env() -> dict | None:
    """The job's runtime environment on a running cluster: only ``AMED_TEACHER_CACHE`` when this process sets it.

    A runtime environment of its own makes Ray start fresh worker processes for the job instead of using the ones it
    has already started: with one (the ``OMP_NUM_THREADS`` it used to carry) a 4-candidate sweep on the local Ray spent
    0.8 s more after Ray's start (flow wall minus Ray start 5.13 s -> 4.32 s, mean of 3 interleaved runs each;
    BENCHMARKS "Fixed overhead, third pass"). So none by default: a local Ray needs none (its processes inherit this
    process's environment), and torch's threads are set by each task (``flows.cluster.worker.setup_worker``,
    ``compute.torch_threads``; Ray itself gives a task's worker ``OMP_NUM_THREADS`` = its CPUs)."""
    if "AMED_TEACHER_CACHE" in os.environ:
        return {"env_vars": {"AMED_TEACHER_CACHE": os.environ["AMED_TEACHER_CACHE"]}}
    return None


def _kill_local_monitor() -> None:
    """SIGKILL the autoscaler monitor of the local Ray this process started, just before ``ray.shutdown``.

    ``ray.shutdown`` sends each of its processes SIGTERM and waits up to 1 s for it before SIGKILL; the monitor's
    SIGTERM handler tries to report "autoscaler failed" to the GCS and never exits within that second, so every local
    sweep paid 1.0 s (measured: ``_kill_process_impl('monitor')`` 1.02 s of a 1.22 s shutdown). A local Ray has no
    autoscaling to do, so nothing is lost; Ray then finds it dead and moves on. Uses Ray's private process table:
    where that is missing (another Ray version), it does nothing and the shutdown takes its usual second."""
    try:
        from ray._private import ray_constants
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception as e:  # noqa: BLE001 - an optimisation only: ray.shutdown still stops it
        log.debug("could not stop the local Ray monitor early: %s", e)


def _import_work_modules() -> int:
    import amed_core.amed.train  # noqa: F401  (torch, solvers, AMED)
    import flows.storage  # noqa: F401  (fsspec, safetensors)

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
