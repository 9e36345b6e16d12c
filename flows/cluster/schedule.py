"""Scheduling jobs on Ray: one job and wait (:func:`run_one`, what a Prefect task does), many with a bound
(:func:`run_jobs`), the flow-wide bound on jobs in flight (:class:`FlowSlots`), and the work ``amed distill`` starts
before Prefect's API is up (:class:`Prefetched`).

While it waits, the driver logs the progress a job reports to the run store (``progress/<job>.json``). Ray re-runs a
task whose worker process dies (``compute.task_retries`` times); outputs are committed atomically, so a retried job
never reads partial output.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

from flows.cluster.jobs import eval_job, rank_job
from flows.cluster.session import task_options
from flows.cluster.teacher import TeacherRun, start_teacher
from flows.storage.runs import RunStore

log = logging.getLogger("amed.ray")

__all__ = ["run_one", "run_jobs", "FlowSlots", "PrioritySlots", "SLOTS", "Prefetched", "PREFETCHED"]

_REMOTES: dict = {}


def _remote(fn: Callable, compute, *, gpu: bool):
    """``ray.remote(fn)`` with this compute's options, made once per (function, options)."""
    import ray

    opts = task_options(compute, gpu=gpu)
    key = (fn.__name__, json.dumps(opts, sort_keys=True))
    if key not in _REMOTES:
        _REMOTES[key] = ray.remote(fn).options(**opts)
    return _REMOTES[key]


def _log_progress(logger: logging.Logger, label: str, job_id: str, store: RunStore) -> None:
    p = store.progress(job_id)
    if p is not None:
        from amed_core.progress import fmt_loss

        logger.info("%s %s: step %s/%s, loss %s (attempt %s)", label, job_id, p.get("step"), p.get("total"),
                    fmt_loss(p.get("loss")), p.get("attempt"))


def run_one(fn: Callable, job, *, compute, gpu: bool, logger: Optional[logging.Logger] = None,
            store: Optional[RunStore] = None, ref=None, poll_s: float = 1.0, report_s: float = 10.0) -> dict:
    """Run ``fn(job)`` as one Ray task (or wait for ``ref``, the same job already started) and return its record,
    logging the progress the job reports to the store."""
    import ray

    logger = logger or log
    if ref is None:
        ref = _remote(fn, compute, gpu=gpu).remote(job)
    last = time.perf_counter()
    while True:
        ready, _ = ray.wait([ref], timeout=poll_s)
        if ready:
            return ray.get(ref)
        if store is not None and time.perf_counter() - last >= report_s:
            last = time.perf_counter()
            _log_progress(logger, fn.__name__, job.id, store)


def run_jobs(fn: Callable, jobs: Sequence, *, compute, gpu: bool, label: str, store: Optional[RunStore] = None,
             logger: Optional[logging.Logger] = None, poll_s: float = 2.0) -> list[dict]:
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
            logger.info("%s %d/%d done: %s (%.1f s)", label, len(results), len(jobs), jobs[i].id,
                        results[i].get("seconds", 0.0))
        if store is not None and not ready and time.perf_counter() - last_report >= 10 * poll_s:
            last_report = time.perf_counter()
            for i in inflight.values():
                _log_progress(logger, label, jobs[i].id, store)
    return [results[i] for i in range(len(jobs))]


class PrioritySlots:
    """A counting semaphore whose waiters are served by priority, then in arrival order: ``with slots.hold(2): ...``.
    What lets a sweep's trainings (its critical path) take the next free slot before queued panel scores (issue 21)."""

    def __init__(self, n: int):
        import itertools

        self._free, self._cond, self._waiting, self._seq = int(n), threading.Condition(), [], itertools.count()

    @contextmanager
    def hold(self, priority: int = 0):
        import heapq

        with self._cond:
            ticket = (-int(priority), next(self._seq))
            heapq.heappush(self._waiting, ticket)
            while not (self._free > 0 and self._waiting[0] == ticket):
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._free -= 1
            self._cond.notify_all()
        try:
            yield self
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


class FlowSlots:
    """At most ``compute.max_parallel`` jobs of one flow run in flight: Prefect runs the tasks in threads, each
    takes a slot of its flow run's semaphore around its Ray job; a waiting job of higher ``priority`` (training)
    gets the next free slot first."""

    def __init__(self):
        self._slots: dict[str, PrioritySlots] = {}

    def slot(self, max_parallel: int, priority: int = 0):
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        key = str(ctx.flow_run.id) if ctx and ctx.flow_run else "local"
        return self._slots.setdefault(key, PrioritySlots(max_parallel)).hold(priority)


class Prefetched:
    """Work started on Ray before the Prefect API is up: teacher shards and base-solver scores (or the panel's ranking
    round), which need nothing upstream. ``amed distill`` calls :meth:`start` while Prefect's ephemeral API is still starting; the flow's teacher
    and evaluate tasks then :meth:`take_teacher` / :meth:`take_eval` these instead of submitting the same work again,
    and the command :meth:`clear` s what is left when the flow ends."""

    def __init__(self):
        self._teachers: dict[str, TeacherRun] = {}
        self._evals: dict[str, Any] = {}

    def start(self, plan, compute) -> int:
        """Start every missing teacher shard and every baseline score not in the store; returns the jobs started."""
        from amed_core.teacher import TeacherSpec
        from flows.storage.teachers import TeacherStore

        n = 0
        for t in plan.teachers:
            store = TeacherStore(plan.store_url, storage_options=plan.storage_options)
            spec = TeacherSpec.from_json(t.spec_json)
            store.put_spec(spec)
            missing = store.missing_shards(spec)
            if missing:
                self._teachers[t.spec_hash] = start_teacher(t.dataset, t.spec_json, missing, store_url=plan.store_url,
                                                            storage_options=plan.storage_options, compute=compute)
                n += len(missing)
        # With a ranking round (issue 21) the panel starts with it; which entries get full scores comes after.
        fn, jobs = (rank_job, plan.rank) if plan.rank else (eval_job, [] if plan.pending_init else plan.baselines)
        remote = _remote(fn, compute, gpu=True)
        for b in jobs:
            if not RunStore(b.store_url, b.storage_options).exists(b.result_key):
                self._evals[b.id] = remote.remote(b)
                n += 1
        return n

    def take_teacher(self, spec_hash: str) -> Optional[TeacherRun]:
        return self._teachers.pop(spec_hash, None)

    def has_teacher(self, spec_hash: str) -> bool:
        return spec_hash in self._teachers

    def has_eval(self, job_id: str) -> bool:
        return job_id in self._evals

    def take_eval(self, job_id: str):
        return self._evals.pop(job_id, None)

    def clear(self) -> None:
        self._teachers.clear()
        self._evals.clear()

    def __len__(self) -> int:
        return len(self._teachers) + len(self._evals)


# One of each per process: Prefect hands tasks JSON-able parameters, so a semaphore or a Ray reference cannot travel
# as one; the tasks (threads of the flow's process) find them here.
SLOTS = FlowSlots()
PREFETCHED = Prefetched()
