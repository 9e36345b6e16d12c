"""Evaluation and registry benchmark: FID feature throughput, Frechet distance cost, MLflow log+register cost.

    .venv/bin/python bench/eval_registry.py fid --batch 16 --batches 3 --size 32
    .venv/bin/python bench/eval_registry.py fd --dim 2048
    .venv/bin/python bench/eval_registry.py register --candidates 4

fid: images/s through the FID Inception (random weights have the real network's cost), uint8 CIFAR-sized
inputs resized to 299 (TF1 rule), ``torch.get_num_threads()`` threads; first batch excluded (warm-up);
also CPU seconds per image (process time: less sensitive to other load on the machine) and the load average.
fd: seconds for one 2048-d Frechet distance (amed_core.metrics, eigh-based) and for scipy.linalg.sqrtm's
formula (EDM fid.py / pytorch-fid), and their difference, on covariances of 5000 random features.
register: ``flows.registry.log_sweep`` on a fresh SQLite database in a temp folder (digits-gmm teacher,
untrained predictors): seconds for the first candidate (includes creating the database) and the median of
the following ones (child run, params, metrics, checkpoint + plot artifacts, pyfunc logged from code,
loaded back and run once, registered, aliases).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def bench_fid(batch: int, batches: int, size: int) -> dict:
    from amed_core.fid import InceptionV3Features

    net = InceptionV3Features()  # random init: same FLOPs as the real weights
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    net(x[:2])  # warm-up
    times, cpu = [], []
    for _ in range(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        net(x)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    med = statistics.median(times)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"batch": batch, "input_size": size, "threads": torch.get_num_threads(), "images_per_s": batch / med,
            "seconds_per_batch": med, "cpu_seconds_per_image": statistics.median(cpu) / batch,
            "hours_for_50k": 50_000 / (batch / med) / 3600, "load_average_1min": load}


def bench_fd(dim: int) -> dict:
    import scipy.linalg

    from amed_core.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5000, dim)) @ (rng.normal(size=(dim, dim)) / np.sqrt(dim))
    b = a[:, ::-1] * 1.05 + 0.01
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    t0 = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    ref = float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * covmean)))
    t_ref = time.perf_counter() - t0
    return {"dim": dim, "ours_s": t_ours, "scipy_sqrtm_s": t_ref, "fd": ours, "abs_diff": abs(ours - ref),
            "rel_diff": abs(ours - ref) / abs(ref)}


def bench_register(n: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from flows.env import apply_safe_defaults

    apply_safe_defaults()
    import test_registry as T  # the test's candidate builder: real checkpoints, real sweep config

    from amed_core.adapters import load_teacher
    from flows.registry import log_sweep

    tmp = Path(tempfile.mkdtemp(prefix="amed-bench-reg-"))
    teacher = load_teacher("digits-gmm")
    cfg = T._config("bench", f"sqlite:///{tmp / 'mlflow.db'}")
    cands = [T._candidate(tmp, teacher, solver="amed", seed=i, value=1.0 - i / 100) for i in range(n)]
    t0 = time.perf_counter()
    first = log_sweep(cfg, cands[:1])
    t_first_sweep = time.perf_counter() - t0
    rest = log_sweep(cfg, cands[1:])
    return {"candidates": n, "first_sweep_s (new db, 1 candidate)": t_first_sweep,
            "first_candidate_s": first.seconds_per_candidate[0],
            "median_candidate_s": statistics.median(rest.seconds_per_candidate),
            "all_candidate_s": [round(s, 2) for s in first.seconds_per_candidate + rest.seconds_per_candidate]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fid", "fd", "register", "all"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {}
    if a.what in ("fid", "all"):
        out["fid"] = bench_fid(a.batch, a.batches, a.size)
    if a.what in ("fd", "all"):
        out["fd"] = bench_fd(a.dim)
    if a.what in ("register", "all"):
        out["register"] = bench_register(a.candidates)
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
