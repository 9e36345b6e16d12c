"""Training cost per candidate: GS against AMED and EPD, interleaved in one process (same load, same threads), on one
teacher, at given NFEs; prints a table and the ratios GS / AMED.

    .venv/bin/python bench/gs_cost.py --teacher digits-gmm --nfes 4,8
    .venv/bin/python bench/gs_cost.py --teacher digits-tiny-unet --nfes 4,8 --gs-iterations 50 --trajectories 256

GS: --gs-iterations optimiser steps of the reference's recipe (batch 24, float32), timed and scaled to the 3,000 /
10,000 iterations the benchmarks and the reference use (its cost is linear in iterations: every step samples the whole
trajectory). AMED: amed+ipndm with TrainConfig.improved on --trajectories trajectories (on-the-fly teacher included).
EPD: epd+ipndm (K = 2), 8 passes over --trajectories stored trajectories (the stored teacher not included). The GS
teacher (endpoint-only Heun, 64 steps, 2400 trajectories) is timed once. Repeats alternate the three, so a load change
hits all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from amed_core import families as F
from amed_core.adapters import load_teacher
from amed_core.amed import PredictorConfig, SamplerSpec, TrainConfig, train_amed
from amed_core.methods import num_steps_for
from amed_core.methods.epd import EPDTrainConfig
from amed_core.methods.gs import GSTrainConfig
from amed_core.schedules import ScheduleSpec
from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard, shard_to_batches


def _shard(teacher, grid, n, M):
    spec = TeacherSpec.for_denoiser(teacher, [grid], num_trajectories=n, shard_size=n, sub_steps=M, solver="heun",
                                    dtype="float64")
    return generate_shard(teacher, spec, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="digits-gmm")
    ap.add_argument("--nfes", default="4,8")
    ap.add_argument("--gs-iterations", type=int, default=200)
    ap.add_argument("--trajectories", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    teacher = load_teacher(args.teacher)
    sch = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
    t = time.perf_counter()
    gs_teacher = _shard(teacher, StudentGrid(sch, 2), 2400, 63)
    gs_teacher_s = time.perf_counter() - t
    x0, y = gs_teacher.noise.double(), gs_teacher.states[-1].double()
    rows = []
    for nfe in [int(v) for v in args.nfes.split(",")]:
        afs = nfe % 2 == 1
        N = num_steps_for("epd+ipndm", nfe, afs)
        epd_shard = _shard(teacher, StudentGrid(sch, N), args.trajectories, 4)
        times = {"gs": [], "amed": [], "epd": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            F.gs.fit(teacher, x0[:1400], y[:1400], GSTrainConfig(iterations=args.gs_iterations, dtype="float32"),
                     nfe=nfe)
            times["gs"].append((time.perf_counter() - t) / args.gs_iterations)
            spec = SamplerSpec.create("amed+ipndm", nfe, afs=afs, schedule=ScheduleSpec("polynomial", rho=7.0),
                                      predictor=PredictorConfig(scale_dir=0.01, scale_time=0.2), afs_in_history=False,
                                      denoiser=teacher)
            t = time.perf_counter()
            train_amed(teacher, spec, TrainConfig.improved("amed+ipndm", num_trajectories=args.trajectories))
            times["amed"].append(time.perf_counter() - t)
            grid = sch.grid(N)
            batches = list(shard_to_batches(epd_shard, grid, batch_size=128)) * 8
            t = time.perf_counter()
            F.epd.fit(teacher, grid, batches, EPDTrainConfig(solver="epd+ipndm", afs=afs, loss_weighting="relative",
                                                             lr=5e-2), nfe=nfe)
            times["epd"].append(time.perf_counter() - t)
        it = min(times["gs"])
        rows.append((nfe, 1000 * it, 3000 * it, 10_000 * it, min(times["amed"]), min(times["epd"])))
    load = os.getloadavg()
    print(f"teacher {args.teacher}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; GS teacher (2400 "
          f"trajectories, 64 Heun steps) {gs_teacher_s:.0f} s; best of {args.repeats} interleaved repeats")
    print("| NFE | GS ms / iteration | GS 3,000 it. s | GS 10,000 it. (reference) s | AMED s | EPD s | GS 3,000 / AMED |")
    print("|---|---|---|---|---|---|---|")
    for nfe, ms, s3, s10, amed, epd in rows:
        print(f"| {nfe} | {ms:.1f} | {s3:.0f} | {s10:.0f} | {amed:.1f} | {epd:.1f} | {s3 / amed:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
