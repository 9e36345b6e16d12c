"""What planning needs to know about a teacher, read where the model may be loaded, never in the flow's process.

Planning (``flows.plan``) needs a teacher's identity (content hash), sigma range, VP table (``alphas_cumprod``), sample
shape, label count and feature source, not its weights. :func:`probe_teacher` returns those as :class:`TeacherFacts`
(a stand-in with the same attributes the planner reads, JSON round-trip) from one probe that loads the model:

- on a Ray worker (one task, ``num_cpus=1``) when a Ray session is up in this process (``amed distill`` plans inside it);
- else in a short-lived child process (``python -m flows.cluster.probe``, dataset JSON on stdin, facts on stdout);
- in this process only for the built-in analytic teachers (``digits-gmm``: a few KB shipped with the package, no
  weights to read).

The flow process never holds the weights or their memory (``tests/test_cluster_probe.py`` checks that planning a
diffusers pipeline folder loads no weights here). Facts are cached per (teacher, options, weights) and file sizes/mtimes
in the process, so a sweep's datasets sharing a teacher probe once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Optional

__all__ = ["TeacherFacts", "teacher_facts", "probe_teacher", "probes_in_process"]

_CACHE: dict[str, "TeacherFacts"] = {}
_IN_PROCESS = ("digits-gmm",)


class TeacherFacts:
    """A teacher's planning facts; quacks like the denoiser where the planner reads it (``identity()``,
    ``sigma_min``, ``sigma_max``, ``shape``, ``label_dim``, ``feature_source``, ``alphas_cumprod``, ``data_range`` and ``data_range_how``:
    declared / measured / unknown); it cannot denoise."""

    def __init__(self, facts: dict[str, Any]):
        self.facts = dict(facts)
        self.sigma_min = float(facts["sigma_min"])
        self.sigma_max = float(facts["sigma_max"])
        self.shape = tuple(int(v) for v in facts["shape"])
        self.label_dim = int(facts.get("label_dim") or 0)
        self.feature_source = str(facts.get("feature_source") or "")
        table = facts.get("alphas_cumprod")
        if table is not None:
            self.alphas_cumprod = tuple(float(a) for a in table)
        self.has_exact_samples = bool(facts.get("has_exact_samples"))
        rng = facts.get("data_range")
        self.data_range = None if rng is None else (float(rng[0]), float(rng[1]))
        self.data_range_how = str(facts.get("data_range_how") or "unknown")

    def identity(self) -> dict:
        return dict(self.facts["identity"])

    def to_json(self) -> str:
        return json.dumps(self.facts, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TeacherFacts":
        return cls(json.loads(text))

    def __call__(self, *args, **kwargs):
        raise TypeError("TeacherFacts are a teacher's planning metadata; load the model (load_teacher) to denoise")

    def __repr__(self) -> str:
        return f"TeacherFacts({self.facts['identity']}, sigma {self.sigma_min}..{self.sigma_max}, shape {self.shape})"


def teacher_facts(dataset) -> dict[str, Any]:
    """Load the dataset's teacher (wherever this runs) and return its planning facts as JSON-able values."""
    from flows.cluster.worker import load_dataset_teacher

    from amed_core.data_range import data_range_of

    den = load_dataset_teacher(dataset)
    rng, how = data_range_of(den)  # declared, else measured on a few samples (decides thresholding defaults)
    table = getattr(den, "alphas_cumprod", None)
    if table is not None:
        table = [float(a) for a in (table.tolist() if hasattr(table, "tolist") else table)]
    return {"identity": den.identity(), "sigma_min": float(den.sigma_min), "sigma_max": float(den.sigma_max),
            "shape": [int(v) for v in den.shape], "label_dim": int(getattr(den, "label_dim", 0) or 0),
            "feature_source": str(getattr(den, "feature_source", "") or ""), "alphas_cumprod": table,
            "has_exact_samples": callable(getattr(den, "sample", None)),
            "data_range": None if rng is None else [float(v) for v in rng], "data_range_how": how}


def probes_in_process(dataset) -> bool:
    """Built-in analytic teachers (no weights, a few KB) are read here; everything else is probed elsewhere."""
    return dataset.teacher in _IN_PROCESS and not dataset.weights_url


def _cache_key(dataset) -> str:
    """Teacher, options and weights, plus the size and mtime of every local file they name (a changed file re-probes)."""
    stamps = []
    for value in [dataset.teacher.partition(":")[2], dataset.weights_url or "", *map(str, (dataset.options or {}).values())]:
        path = os.path.expandvars(os.path.expanduser(str(value)))
        if path and os.path.exists(path):
            for root, _, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
                for f in sorted(files):
                    st = os.stat(os.path.join(root, f))
                    stamps.append([os.path.join(root, f), st.st_size, st.st_mtime_ns])
    return json.dumps([dataset.teacher, dataset.load_kwargs(), stamps], sort_keys=True, default=str)


def probe_teacher(dataset, *, timeout_s: float = 1800.0, use_ray: Optional[bool] = None) -> TeacherFacts:
    """The dataset's :class:`TeacherFacts` without loading its weights in this process (see the module docstring).
    ValueError (the loader's message) when the teacher cannot be loaded."""
    if probes_in_process(dataset):
        return TeacherFacts(teacher_facts(dataset))
    key = _cache_key(dataset)
    if key in _CACHE:
        return _CACHE[key]
    if use_ray is None:
        try:
            import ray

            use_ray = ray.is_initialized()
        except ImportError:
            use_ray = False
    facts = _probe_on_ray(dataset, timeout_s) if use_ray else _probe_in_child(dataset, timeout_s)
    _CACHE[key] = TeacherFacts(facts)
    return _CACHE[key]


def _probe_on_ray(dataset, timeout_s: float) -> dict:
    import ray

    ref = ray.remote(_probe_task).options(num_cpus=1, max_retries=2).remote(dataset.model_dump(mode="json"))
    return _unwrap(ray.get(ref, timeout=timeout_s))


def _probe_task(dataset_json: dict) -> dict:
    return _guarded(dataset_json)


def _guarded(dataset_json: dict) -> dict:
    from flows.config import DatasetConfig

    try:
        return {"ok": teacher_facts(DatasetConfig.model_validate(dataset_json))}
    except (ValueError, OSError) as e:
        return {"error": type(e).__name__, "message": str(e)}


def _unwrap(res: dict) -> dict:
    if "ok" in res:
        return res["ok"]
    raise ValueError(res.get("message") or res.get("error") or "teacher probe failed")


def _probe_in_child(dataset, timeout_s: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "flows.cluster.probe"], input=json.dumps(dataset.model_dump(mode="json")),
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("AMED-PROBE ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"teacher probe of {dataset.teacher!r} exited with {proc.returncode}: {tail}")
    return _unwrap(json.loads(line[len("AMED-PROBE "):]))


def main() -> None:  # python -m flows.cluster.probe  (dataset JSON on stdin)
    res = _guarded(json.loads(sys.stdin.read()))
    print("AMED-PROBE " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
