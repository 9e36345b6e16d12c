"""The stored rmse reference (issue 21, item 4): how close DPM-Solver++(3M) on N log-SNR points (float64) is to the
ODE's solution, per teacher, and what one shared reference costs against one per evaluate job.

    .venv/bin/python bench/reference.py --teachers digits-gmm,digits-tiny-unet --n 64 --json bench/reference.json

For each N in --points: the RMSE between the N-point and the (2N - 1)-point solutions of the same noise (seeds
1000000..; what a sweep records as the reference's convergence) and, where the teacher is a mixture, the RMSE of the
N-point solution to a 4097-point one (a near-exact stand-in). Cost: a sweep with J evaluate jobs of n samples used to
spend J (R - 1) n reference evaluations (R = evaluation.reference_steps, the teacher solver on each job's schedule; heun
doubles it); now (N - 1) n + 2 (N - 1) k once (k = reference_check_samples).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from amed_core.adapters import load_teacher
from amed_core.evaluate import reference_solution
from amed_core.io import atomic_write_bytes
from amed_core.teacher import trajectory_inputs


def measure(teacher: str, n: int, points: list[int]) -> list[dict]:
    den = load_teacher(teacher)
    noise, _ = trajectory_inputs(range(1_000_000, 1_000_000 + n), den.shape)
    fine = reference_solution(den, noise, num_steps=4097, batch_size=n) if hasattr(den, "sample") else None
    rows = []
    for N in points:
        t0 = time.perf_counter()
        with torch.no_grad():
            a = reference_solution(den, noise, num_steps=N, batch_size=n)
            seconds = time.perf_counter() - t0
            b = reference_solution(den, noise, num_steps=2 * N - 1, batch_size=n)
        row = {"teacher": teacher, "points": N, "n": n, "rmse_N_vs_2N-1": float(((a - b) ** 2).mean().sqrt()),
               "seconds_N": seconds, "load": os.getloadavg()[0]}
        if fine is not None:
            row["rmse_N_vs_4097"] = float(((a - fine) ** 2).mean().sqrt())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teachers", default="digits-gmm,digits-tiny-unet")
    p.add_argument("--points", default="17,33,65,129,257")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for t in args.teachers.split(",") for r in measure(t, args.n, [int(v) for v in args.points.split(",")])]
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(rows, indent=1).encode())
    print("| teacher | N | RMSE N vs 2N - 1 | RMSE N vs 4097 | s for N (n samples) |\n|---|---|---|---|---|")
    for r in rows:
        exact = f"{r['rmse_N_vs_4097']:.2e}" if "rmse_N_vs_4097" in r else "-"
        print(f"| {r['teacher']} | {r['points']} | {r['rmse_N_vs_2N-1']:.2e} | {exact} | {r['seconds_N']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
