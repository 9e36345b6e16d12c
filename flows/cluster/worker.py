"""What runs inside a Ray worker before its job: torch threads, the device Ray assigned, the dataset's teacher, and
the progress reports a job writes to the run store (``progress/<job>.json``) for the flow to log."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from typing import Optional

from flows.config import DatasetConfig
from flows.storage.runs import RunStore

__all__ = ["setup_worker", "device", "device_name", "assigned_gpus", "node_info", "to_device", "load_dataset_teacher",
           "teacher_cache_size", "Progress"]


def setup_worker(torch_threads: int) -> None:
    import torch

    torch.set_num_threads(torch_threads)


def device():
    """The GPU Ray assigned to this task/actor (``ray.get_gpu_ids()``; with a fractional ``gpus_per_task`` several tasks
    share it), else the CPU (no GPU assigned, or no CUDA in this process)."""
    import ray
    import torch

    if not ray.is_initialized():  # called in-process (tests, CLI): ray.get_gpu_ids() would start a local Ray
        return torch.device("cpu")
    return torch.device(device_name(assigned_gpus(), torch.cuda.is_available(), os.environ.get("CUDA_VISIBLE_DEVICES")))


def assigned_gpus() -> list:
    """The GPU ids Ray assigned to the running task or actor ([] outside Ray or without GPUs)."""
    import ray

    try:
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - not inside Ray
        return []


def device_name(gpu_ids, cuda_available: bool, visible: Optional[str] = None) -> str:
    """``cuda:<i>`` for the first GPU Ray assigned, ``cpu`` without one or without CUDA. Ray exports
    ``CUDA_VISIBLE_DEVICES`` = the assigned ids, so torch numbers them from 0: ``i`` is the assigned id's position
    there (the id itself when the variable is unset, e.g. ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``)."""
    if not gpu_ids or not cuda_available:
        return "cpu"
    gid = str(gpu_ids[0])
    seen = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if seen:
        return f"cuda:{seen.index(gid)}" if gid in seen else "cuda:0"
    return f"cuda:{int(gid)}" if gid.isdigit() else "cuda:0"


def node_info() -> dict:
    """Where this job runs: Ray node id, host, pid (recorded in progress reports; empty node outside Ray)."""
    import socket

    node = ""
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "gpus": [str(g) for g in assigned_gpus()]}


def to_device(batches, device):
    """TeacherBatches moved to ``device`` as they are drawn (unchanged on the CPU)."""
    from amed_core.teacher import TeacherBatch

    for b in batches:
        yield b if device.type == "cpu" else TeacherBatch(
            noise=b.noise.to(device), states=b.states.to(device),
            class_labels=None if b.class_labels is None else b.class_labels.to(device))


_TEACHERS: "OrderedDict[str, object]" = OrderedDict()  # (teacher, options) -> loaded denoiser, most recent last
_TEACHERS_GUARD = threading.RLock()


def teacher_cache_size() -> int:
    """How many loaded teachers a process keeps: ``AMED_TEACHER_CACHE`` (default 2; 0 loads on every call)."""
    raw = os.environ.get("AMED_TEACHER_CACHE", "2")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"AMED_TEACHER_CACHE must be a whole number of teachers (0 = no cache), got {raw!r}") from None
    if n < 0:
        raise ValueError(f"AMED_TEACHER_CACHE must be >= 0, got {n}")
    return n


def load_dataset_teacher(dataset: DatasetConfig):
    """The dataset's teacher denoiser (``amed_core.denoisers.load_teacher(teacher, **options, weights_url=)``), loaded
    once per process and kept for the next call.

    A Ray worker runs many jobs of a sweep (train, evaluate, the registration checks), each of which needs the teacher:
    without the cache each loaded it again (the weights read and, for a network, hashed: seconds per job for a large
    model; BENCHMARKS "Teacher cache"). The ``teacher_cache_size()`` most recently used teachers stay loaded. Callers
    move it with ``.to(device)``, which for a torch module moves the cached object itself: a job that needs it on
    another device moves it again (one device per worker in practice). Shared by the threads of one process.
    """
    from amed_core.denoisers import load_teacher

    keep = teacher_cache_size()
    if keep == 0:
        return load_teacher(dataset.teacher, **dataset.load_kwargs())
    key = json.dumps([dataset.teacher, dataset.load_kwargs()], sort_keys=True, default=str)
    with _TEACHERS_GUARD:
        if key in _TEACHERS:
            _TEACHERS.move_to_end(key)
            return _TEACHERS[key]
        while len(_TEACHERS) >= keep:
            _TEACHERS.popitem(last=False)  # drop the least recently used before loading: one model fewer at the peak
        den = _TEACHERS[key] = load_teacher(dataset.teacher, **dataset.load_kwargs())
        return den


class Progress:
    """Throttled progress reports of a running job (pid, started, step, total, loss) to the store."""

    def __init__(self, store: RunStore, job_id: str, total: int, every_s: float = 1.0):
        self.store, self.key, self.total, self.every_s = store, f"progress/{job_id}.json", total, every_s
        prev = store.get_json(self.key) if store.exists(self.key) else {}
        nodes = list(prev.get("nodes", []))
        self.state = {"job": job_id, **node_info(), "attempt": int(prev.get("attempt", 0)) + 1,
                      "step": 0, "total": total, "loss": None, "done": False, "started": time.time()}
        self.state["nodes"] = nodes + [self.state["node"]]  # every attempt's node, in order
        self._last = 0.0
        self.write()
        from flows.storage.barriers import held

        self._hold = held(store.fs, store.root, "train-step")  # a fault test's hold (flows.storage.barriers)

    def write(self) -> None:
        self.state["updated"] = time.time()
        self.store.put_json(self.key, self.state)
        self._last = time.perf_counter()

    def update(self, step: int, loss: Optional[float] = None, *, force: bool = False) -> None:
        self.state["step"] = step
        if loss is not None:
            self.state["loss"] = float(loss)
        if self._hold is not None and step > 0:  # wait (after a report of this step) until the test has acted
            hold, self._hold = self._hold, None
            self.write()
            from flows.storage.barriers import wait_at

            info = {k: self.state[k] for k in ("job", "attempt", "node", "pid", "step") if k in self.state}
            wait_at(self.store.fs, self.store.root, "train-step", info, hold)
            return
        if force or time.perf_counter() - self._last >= self.every_s:
            self.write()

    def finish(self) -> None:
        self.state["done"] = True
        self.state["step"] = self.total
        self.write()

