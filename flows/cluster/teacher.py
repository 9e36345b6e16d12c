"""Teacher generation on Ray: actors that load the teacher model once and each commit many shards to the store."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from flows.cluster.session import task_options
from flows.cluster.worker import device, load_dataset_teacher, node_info, setup_worker
from flows.config import DatasetConfig

__all__ = ["TeacherWorker", "TeacherRun", "start_teacher"]


class TeacherWorker:
    """Loads one teacher model and writes shards of a TeacherSpec to the teacher store."""

    def __init__(self, dataset: DatasetConfig, store_url: str, storage_options: dict, torch_threads: int = 1):
        setup_worker(torch_threads)
        self.device = device()
        self.denoiser = load_dataset_teacher(dataset).to(self.device)
        self.store_url, self.storage_options = store_url, storage_options

    def pid(self) -> int:
        return os.getpid()

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


@dataclass
class TeacherRun:
    """Shards in flight on teacher actors (round robin; equal-size shards keep the actors equally busy)."""

    actors: list
    refs: list
    missing: list
    spec_json: str = ""

    def finish(self, on_shard: Callable[[dict, int, int], None]) -> list[dict]:
        """Wait for every shard (reporting each as it lands), then release the actors. A shard another writer was
        generating is asked for again once the actors are free, this time waiting for it (adopted, not redone)."""
        import ray

        out, pending, total, k = [], list(self.refs), len(self.refs), 0
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                rec = ray.get(ready[0])
                if rec.get("deferred"):
                    actor = self.actors[k % len(self.actors)]
                    k += 1
                    pending.append(actor.generate.remote(self.spec_json, rec["index"], True))
                    continue
                out.append(rec)
                on_shard(rec, len(out), total)
        finally:
            for a in self.actors:
                ray.kill(a)
        return out


def start_teacher(dataset: DatasetConfig, spec_json: str, missing: Sequence[int], *, store_url: str, storage_options: dict,
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
    return TeacherRun(actors, refs, list(missing), spec_json)

