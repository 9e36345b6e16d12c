"""What runs inside a Ray worker before its job: torch threads, the device Ray assigned, the dataset's teacher, and
the progress reports a job writes to the run store (``progress/<job>.json``) for the flow to log."""

from __future__ import annotations

import os
import time
from typing import Optional

from flows.config import DatasetConfig
from flows.storage.runs import RunStore

__all__ = ["setup_worker", "device", "to_device", "load_dataset_teacher", "Progress"]


def setup_worker(torch_threads: int) -> None:
    import torch

    torch.set_num_threads(torch_threads)


def device():
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


def to_device(batches, device):
    """TeacherBatches moved to ``device`` as they are drawn (unchanged on the CPU)."""
    from amed_core.teacher import TeacherBatch

    for b in batches:
        yield b if device.type == "cpu" else TeacherBatch(
            noise=b.noise.to(device), states=b.states.to(device),
            class_labels=None if b.class_labels is None else b.class_labels.to(device))


def load_dataset_teacher(dataset: DatasetConfig):
    """The dataset's teacher denoiser (``amed_core.denoisers.load_teacher(teacher, **options, weights_url=)``)."""
    from amed_core.denoisers import load_teacher

    return load_teacher(dataset.teacher, **dataset.load_kwargs())


class Progress:
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

