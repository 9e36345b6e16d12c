"""Teacher generation on Ray: one task per shard, at most ``compute.teacher_actors`` at once, each committing its shard
to the store.

The shards once ran on dedicated Ray actors (one process per actor, holding the model). They are plain tasks now, on
the pooled workers that then run the sweep's train and evaluate jobs: a worker loads the teacher once
(:func:`flows.cluster.worker.load_dataset_teacher` keeps it) for its shards and its later jobs alike, and no process is
started and killed for the teacher stage alone (a cold Ray worker is ~2 s of CPU before its first task on the 2-core
VM: BENCHMARKS "Fixed overhead")."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from flows.cluster.session import task_options
from flows.cluster.worker import device, load_dataset_teacher, node_info, setup_worker
from flows.config import DatasetConfig

__all__ = ["TeacherWorker", "TeacherRun", "start_teacher", "generate_task"]


class TeacherWorker:
    """The teacher (this process's cached copy, on the device Ray assigned) and the store shards of a TeacherSpec go to."""

    def __init__(self, dataset: DatasetConfig, store_url: str, storage_options: dict, torch_threads: int = 1):
        setup_worker(torch_threads)
        self.device = device()
        self.denoiser = load_dataset_teacher(dataset).to(self.device)
        self.store_url, self.storage_options = store_url, storage_options

    def generate(self, spec_json: str, index: int, wait: bool = False) -> dict:
        """Generate shard ``index`` and commit it (write-once object, then its manifest entry).

        When another writer (a concurrent sweep sharing this teacher) holds the shard's claim, return
        ``{"deferred": True}`` at once, or with ``wait`` poll until it is committed (adopt it) or its claim goes stale
        (take it over): :mod:`flows.storage.claims`."""
        from amed_core.teacher import TeacherSpec, generate_shard
        from flows.storage.teachers import TeacherStore

        spec = TeacherSpec.from_json(spec_json)
        store = TeacherStore(self.store_url, storage_options=self.storage_options)
        t0 = time.perf_counter()
        book = store.claims(spec)
        got = book.try_claim(index)
        while got is None:
            if not wait:
                return {"index": index, "deferred": True, "holder": book.holder(index) or {}}
            time.sleep(0.5)
            got = book.try_claim(index)
        compute, nfe, span, cpu = 0.0, 0, [], 0.0
        if isinstance(got, dict):  # committed by another writer meanwhile
            entry = got
        else:
            with got:
                entry = store.adopt_shard(spec, index)  # a killed writer may have left a complete object behind
                if entry is None:
                    from flows.storage.barriers import wait_at

                    wait_at(store.fs, store.root, "teacher-shard",  # a fault test's hold (none: one existence check)
                            {"index": index, "spec_hash": spec.spec_hash, **node_info()})
                    c0, cpu0 = time.time(), time.process_time()
                    shard = generate_shard(self.denoiser, spec, index, device=self.device)
                    cpu = time.process_time() - cpu0
                    compute = time.time() - c0
                    span = [[c0, c0 + compute]]
                    nfe = shard.nfe * shard.num_samples
                    entry = store.commit_shard(spec, shard)
        where = node_info()
        self._report(spec.spec_hash, index, {**where, "index": index, "generated": bool(nfe), "done": True})
        return {"index": index, "compute_seconds": compute, "seconds": time.perf_counter() - t0, "nfe": nfe,
                "entry": entry, "pid": os.getpid(), "node": where["node"], "compute_spans": span, "cpu_seconds": cpu}

    def _report(self, spec_hash: str, index: int, state: dict) -> None:
        """``progress/teacher-<hash[:16]>-<index>.json`` in the run store: which node made (or adopted) the shard."""
        from flows.storage.runs import RunStore

        try:
            RunStore(self.store_url, self.storage_options).put_json(
                f"progress/teacher-{spec_hash[:16]}-{index:05d}.json", {**state, "updated": time.time()})
        except Exception:  # noqa: BLE001 - a report must never fail a committed shard
            pass


def generate_task(dataset: DatasetConfig, store_url: str, storage_options: dict, torch_threads: int, spec_json: str,
                  index: int, wait: bool = False) -> dict:
    """Ray task: generate and commit shard ``index`` (:meth:`TeacherWorker.generate`)."""
    return TeacherWorker(dataset, store_url, storage_options, torch_threads).generate(spec_json, index, wait)


@dataclass
class TeacherRun:
    """Shard tasks of one teacher: ``window`` in flight, the rest queued (each entry ``(index, wait)``)."""

    submit: Callable[[int, bool], object]
    window: int
    queue: list
    refs: list
    missing: list

    def _fill(self) -> None:
        while self.queue and len(self.refs) < self.window:
            index, wait = self.queue.pop(0)
            self.refs.append(self.submit(index, wait))

    def finish(self, on_shard: Callable[[dict, int, int], None]) -> list[dict]:
        """Wait for every shard (reporting each as it lands), keeping ``window`` tasks in flight. A shard another writer
        was generating is asked for again once a slot is free, this time waiting for it (adopted, not redone)."""
        import ray

        out, total = [], len(self.missing)
        self._fill()
        while self.refs:
            ready, self.refs = ray.wait(self.refs, num_returns=1)
            rec = ray.get(ready[0])
            if rec.get("deferred"):
                self.queue.append((rec["index"], True))
            else:
                out.append(rec)
                on_shard(rec, len(out), total)
            self._fill()
        return out


def start_teacher(dataset: DatasetConfig, spec_json: str, missing: Sequence[int], *, store_url: str, storage_options: dict,
                  compute) -> TeacherRun:
    """Start generating the missing shards: ``compute.teacher_actors`` tasks at once (the rest follow as they finish,
    in :meth:`TeacherRun.finish`); retried on another worker when theirs dies (``compute.task_retries``)."""
    import ray

    remote = ray.remote(generate_task).options(**task_options(compute))

    def submit(index: int, wait: bool):
        return remote.remote(dataset, store_url, storage_options, compute.torch_threads, spec_json, index, wait)

    window = max(1, min(compute.teacher_actors, len(missing)))
    run = TeacherRun(submit, window, [(int(i), False) for i in missing], [], list(missing))
    run._fill()
    return run
