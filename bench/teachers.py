"""How "real" each neural teacher is: its 200-step samples next to its data, and how curved its trajectories are.

    .venv/bin/python bench/teachers.py --out bench/teachers --json bench/teachers.json   # both shipped UNets
    .venv/bin/python bench/teachers.py --table bench/teachers.json                      # print only

Per teacher (``digits-tiny-unet``, ``photos-tiny-unet`` by default; ``--teachers`` names others):
- ``<out>/<teacher>-samples.png``: 64 samples of DPM-Solver++(3M) on 201 log-SNR points (200 steps, float64, no
  thresholding) from noise seeds 12345.., beside 64 training images (digits / random photo crops, seed 0);
- pixel statistics of 256 such samples against the data's (mean, std, the 0.5 / 99.5 percentiles): a teacher that
  learned its data matches them;
- the trajectory deviation of the GITS paper (Chen et al. 2024; ``amed_core.evaluate.trajectory``) on the same 200-step
  trajectories: the per-sample maximum distance to the straight line between the trajectory's ends, per dimension and
  relative to the line's length (0 = straight), median / p90 over samples, and the sigma where it peaks;
- the convergence of that 201-point solution: RMSE to the 401-point one of the same noise (first 64 seeds);
- how smooth the denoiser is in sigma: the mean |d^2 D / d(ln sigma)^2| (per dimension) of D(sigma n; sigma) along
  2001 log-spaced sigmas for 2 noise draws, in the five ln-sigma fifths of the range (an ODE solver's error grows with
  it; the exact digits mixture is the yardstick).
Seconds are wall-clock on whatever machine runs it (printed with the load average).
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
from amed_core.evaluate import REFERENCE_OPTIONS, REFERENCE_SOLVER, save_side_by_side_png
from amed_core.evaluate.trajectory import deviation_summary
from amed_core.io import atomic_write_bytes
from amed_core.methods import solve
from amed_core.schedules import ScheduleSpec
from amed_core.teacher import trajectory_inputs

DEFAULT_TEACHERS = ("digits-tiny-unet", "photos-tiny-unet")


def _data(teacher: str, shape, n: int) -> torch.Tensor:
    if "photos" in teacher:
        from amed_core.tiny_train import PhotoCrops

        return PhotoCrops(int(shape[-1])).draw(n, torch.Generator().manual_seed(0))
    from amed_core.tiny_train import digits_dataset

    x, _ = digits_dataset(int(shape[-1]))
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]]


def _stats(x: torch.Tensor) -> dict:
    v = x.to(torch.float64).reshape(-1)
    q = torch.quantile(v[: 1 << 24], torch.tensor([0.005, 0.995], dtype=torch.float64))
    return {"mean": float(v.mean()), "std": float(v.std()), "p0.5": float(q[0]), "p99.5": float(q[1])}


def _solve(den, noise, points: int, keep: bool, batch: int = 64):
    sig = ScheduleSpec("logsnr", sigma_min=den.sigma_min, sigma_max=den.sigma_max).grid(points)
    xs, trajs = [], []
    for lo in range(0, noise.shape[0], batch):
        with torch.no_grad():
            res = solve(REFERENCE_SOLVER, den, noise[lo:lo + batch] * sig[0], sig, return_trajectory=keep,
                        **REFERENCE_OPTIONS)
        xs.append(res.x)
        if keep:
            trajs.append(res.trajectory)
    return torch.cat(xs), (torch.cat(trajs, dim=1) if keep else None), sig


def measure(teacher: str, out: Path, n: int) -> dict:
    den = load_teacher(teacher)
    t0 = time.perf_counter()
    noise, _ = trajectory_inputs(range(12345, 12345 + n), den.shape)
    x, traj, sig = _solve(den, noise, 201, keep=True)
    seconds = time.perf_counter() - t0
    data = _data(teacher, den.shape, max(n, 64))
    out.mkdir(parents=True, exist_ok=True)
    png = save_side_by_side_png({f"{teacher}: 200-step samples": x[:64], "training data": data[:64]},
                                out / f"{teacher}-samples.png")
    fine, _, _ = _solve(den, noise[:64], 401, keep=False)
    conv = float(((x[:64] - fine) ** 2).mean().sqrt())
    params = sum(p.numel() for p in den.parameters())
    return {"teacher": teacher, "params": int(params), "shape": list(den.shape), "num_samples": n,
            "smoothness": smoothness(den),
            "sample_stats": _stats(x), "data_stats": _stats(data), "deviation": deviation_summary(traj, sig),
            "rmse_201_vs_401_points": conv, "seconds_200_steps": seconds, "png": str(png),
            "load": os.getloadavg()[0]}


def smoothness(den, points: int = 2001) -> list[float]:
    """Mean |d^2 D / d(ln sigma)^2| per dimension in each fifth of the ln-sigma range (finite differences)."""
    import math

    n = torch.randn(2, *den.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ls = torch.linspace(math.log(den.sigma_min), math.log(den.sigma_max), points, dtype=torch.float64)
    with torch.no_grad():
        D = torch.stack([den(n * s, s) for s in ls.exp()]).reshape(points, -1)
    h = float(ls[1] - ls[0])
    d2 = (D[2:] - 2 * D[1:-1] + D[:-2]).abs().mean(dim=1) / h ** 2
    return [float(c.mean()) for c in d2.chunk(5)]


def table(rows: list[dict]) -> str:
    head = ("| teacher | params | samples: mean / std / p0.5 / p99.5 | data: mean / std / p0.5 / p99.5 | max deviation "
            "p50 / p90 (per dim) | relative p50 / p90 | peak at sigma | 201 vs 401 points RMSE |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        s, d, v = r["sample_stats"], r["data_stats"], r["deviation"]
        lines.append(f"| {r['teacher']} | {r['params']:,} | {s['mean']:.3f} / {s['std']:.3f} / {s['p0.5']:.2f} / "
                     f"{s['p99.5']:.2f} | {d['mean']:.3f} / {d['std']:.3f} / {d['p0.5']:.2f} / {d['p99.5']:.2f} | "
                     f"{v['max_dev_p50']:.3f} / {v['max_dev_p90']:.3f} | {v['max_dev_rel_p50']:.4f} / "
                     f"{v['max_dev_rel_p90']:.4f} | {v['sigma_at_max_p50']:.3g} | {r['rmse_201_vs_401_points']:.2e} |")
    lines += ["", "| teacher | mean abs d2D/d(ln sigma)^2 in the ln-sigma fifths, small sigma first |", "|---|---|"]
    lines += [f"| {r['teacher']} | " + " / ".join(f"{v:.3g}" for v in r["smoothness"]) + " |"
              for r in rows if "smoothness" in r]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teachers", default=",".join(DEFAULT_TEACHERS))
    p.add_argument("--n", type=int, default=256, help="samples per teacher")
    p.add_argument("--out", default="bench/teachers", help="folder for the PNGs")
    p.add_argument("--json", default=None, help="append results here (skips teachers already in it)")
    p.add_argument("--table", nargs="*", default=None, help="print the table of these JSON files and exit")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.table is not None:
        rows = [r for f in args.table for r in json.loads(Path(f).read_text())]
        print(table(rows))
        return 0
    torch.set_num_threads(args.threads)
    db = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else []
    for t in args.teachers.split(","):
        old = next((r for r in db if r["teacher"] == t), None)
        if old is not None:
            if "smoothness" not in old:
                old["smoothness"] = smoothness(load_teacher(t))
                if args.json:
                    atomic_write_bytes(Path(args.json), json.dumps(db, indent=1).encode())
            continue
        row = measure(t, Path(args.out), args.n)
        print(json.dumps(row), flush=True)
        db.append(row)
        if args.json:
            atomic_write_bytes(Path(args.json), json.dumps(db, indent=1).encode())
    print(table(db))
    return 0


if __name__ == "__main__":
    sys.exit(main())
