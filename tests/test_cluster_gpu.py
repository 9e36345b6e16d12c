"""GPU packing (issue 13, item 6) checked on a machine without CUDA: Ray is told the node has 2 GPUs (a logical
resource count), tasks ask for ``compute.gpus_per_task = 0.25`` through the flow's own options and scheduler
(``task_options``, ``run_jobs``): four run at once on each GPU, each would use ``cuda:<its assigned GPU>`` and, with
no CUDA in the process, falls back to the CPU."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

from flows.cluster.worker import device_name

pytestmark = [pytest.mark.services]


def _probe(job) -> dict:
    import os
    import time

    from flows.cluster.worker import assigned_gpus, device, device_name, node_info

    t0 = time.time()
    time.sleep(job.sleep)
    ids = assigned_gpus()
    return {"id": job.id, "gpus": [str(g) for g in ids], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "would_use": device_name(ids, True, os.environ.get("CUDA_VISIBLE_DEVICES")), "uses": str(device()),
            "start": t0, "end": time.time(), "node": node_info()["node"], "seconds": job.sleep}


def test_device_name_maps_ray_assignment():
    assert device_name([], True) == "cpu"
    assert device_name(["1"], False, "1") == "cpu"            # no CUDA in the process: the CPU
    assert device_name(["3"], True, "3") == "cuda:0"          # Ray exported CUDA_VISIBLE_DEVICES=<assigned>
    assert device_name(["3"], True, "2,3") == "cuda:1"
    assert device_name(["1"], True, None) == "cuda:1"         # no CUDA_VISIBLE_DEVICES: the id itself


def test_fractional_gpus_pack_four_tasks_per_gpu():
    import ray
    from ray import cloudpickle

    from flows.cluster.schedule import run_jobs
    from flows.cluster.session import task_options
    from flows.config import ComputeConfig

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=10, num_gpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        compute = ComputeConfig(gpus_per_task=0.25, cpus_per_task=1, max_parallel=10)
        assert task_options(compute)["num_gpus"] == 0.25
        assert "num_gpus" not in task_options(compute, gpu=False)
        # a first wave starts the worker processes (slow on a loaded box), the second is measured
        run_jobs(_probe, [SimpleNamespace(id=f"w{i}", sleep=1.0) for i in range(10)], compute=compute, gpu=True,
                 label="warm-up", poll_s=0.2)
        t0 = time.time()
        recs = run_jobs(_probe, [SimpleNamespace(id=f"j{i}", sleep=4.0) for i in range(10)], compute=compute, gpu=True,
                        label="probe", poll_s=0.2)
        wall = time.time() - t0
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    per_gpu: dict[str, list] = {}
    for r in recs:
        assert len(r["gpus"]) == 1, r
        per_gpu.setdefault(r["gpus"][0], []).append(r)
        assert r["would_use"] == "cuda:0" and r["visible"] == r["gpus"][0]   # Ray's assignment, numbered from 0
        assert r["uses"] == "cpu"                                           # no CUDA here: the CPU fallback
    assert sorted(per_gpu) == ["0", "1"]

    def peak(rs) -> int:
        events = sorted([(r["start"], 1) for r in rs] + [(r["end"], -1) for r in rs], key=lambda e: (e[0], e[1]))
        n = best = 0
        for _, d in events:
            n += d
            best = max(best, n)
        return best

    assert max(peak(rs) for rs in per_gpu.values()) == 4      # four tasks share a GPU, never five
    assert peak(recs) == 8                                     # 2 GPUs x 4: the 9th and 10th task wait
    print(f"\n10 tasks x 0.25 GPU on 2 logical GPUs: peak 4 per GPU, 8 in all; {wall:.1f}s wall (worker start-up included)")


def test_gpu_bench_scripts_run_on_the_cpu(tmp_path):
    """bench/gpu.py and bench/cuda_paths.py wait for a CUDA machine: their code runs here (every part of gpu.py tiny
    on the CPU; the CPU half of cuda_paths.py), so a lent GPU session spends its minutes measuring, not debugging."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x.split(":", 1)[1]) for x in out.stdout.splitlines() if x.startswith("smoke")]
    assert [sorted(r)[0] for r in lines] == ["batch", "batch", "amed_step_s", "batch"]
    assert lines[3]["tasks_per_gpu"] == 2 and lines[3]["samples_per_s_total"] > 0
    report = tmp_path / "cuda_paths.json"
    out = subprocess.run([sys.executable, "bench/cuda_paths.py", "--devices", "cpu", "--trajectories", "256",
                          "--samples", "1024", "--epochs", "1", "--json", str(report)], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(report.read_text())["rows"]["cpu"]  # 2 batches of 128 x 3 student steps (NFE 5 = 2 * 3 - AFS)
    assert row["finite"] and row["nfe"] == 5 and row["updates"] == 2 * 3 and 0 < row["fd"] < 1e3
