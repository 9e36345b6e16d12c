"""What each fix of a GS reference quirk changes (amed_core.methods.gs: GSConfig's end, start, output, clip_model_time,
s4s_rescale), at initialisation and after training with the same budget, against the reference's behaviour.

    .venv/bin/python bench/gs_fixes.py --teacher digits-gmm --json bench/gs_fixes_gmm.json
    .venv/bin/python bench/gs_fixes.py --table bench/gs_fixes_gmm.json        # print only

Every variant trains from the same endpoint-only teacher pairs (Heun, --teacher-steps steps; --train / --val pairs) with
the reference's recipe (Adam 1e-3, batch 24, EMA 0.999, clip 1.0, the best EMA checkpoint on the held-out pairs) for
--iterations steps, seed 0, float32 arithmetic as the reference. Scores on --n samples from noise seeds 12345..
(disjoint from the teacher's 0..): FD to exact samples (mixtures) and the per-sample RMSE to a --reference-steps
DPM-Solver++(3M) solution of the same noise ending at the teacher's sigma_min (what every other family is scored
against). Each finished cell is appended to --json at once and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from amed_core import families as F
from amed_core.adapters import load_teacher
from amed_core.evaluate import exact_samples, reference_solution, seeded_noise
from amed_core.evaluate.score import per_sample_summary
from amed_core.io import atomic_write_bytes
from amed_core.methods.gs import GSParams, GSTrainConfig
from amed_core.metrics import fd_to_samples
from amed_core.schedules import ScheduleSpec
from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard

# (name, GSConfig options): the reference, each fix alone, the four EDM-convention fixes together, and the S4S mode
# with the reference's doubled ratio and with the fix.
VARIANTS = [
    ("reference", {}),
    ("end=net", {"end": "net"}),
    ("start=edm", {"start": "edm"}),
    ("output=edm", {"output": "edm"}),
    ("clip_model_time", {"clip_model_time": True}),
    ("all four", {"end": "net", "start": "edm", "output": "edm", "clip_model_time": True}),
    ("s4s (reference)", {"theory": False}),
    ("s4s, s4s_rescale=once", {"theory": False, "s4s_rescale": "once"}),
]


def _scores(x: torch.Tensor, ref: torch.Tensor, exact) -> dict:
    x = x.to(torch.float64)
    per = ((x - ref) ** 2).reshape(x.shape[0], -1).mean(dim=1).sqrt()
    out = {"rmse": float(((x - ref) ** 2).mean().sqrt()), **{f"ps_{k}": v for k, v in per_sample_summary(per).items()}}
    if exact is not None:
        out["fd"] = fd_to_samples(x, exact)
    return out


def run(args) -> None:
    teacher = load_teacher(args.teacher)
    path = Path(args.json)
    db = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    noise = seeded_noise(range(args.sample_seed, args.sample_seed + args.n), teacher.shape)
    ref = reference_solution(teacher, noise, num_steps=args.reference_steps).to(torch.float64)
    exact = exact_samples(teacher, args.n, args.sample_seed) if hasattr(teacher, "sample") else None
    db["meta"] = {"teacher": args.teacher, "n": args.n, "iterations": args.iterations, "train": args.train,
                  "val": args.val, "teacher_steps": args.teacher_steps, "reference_steps": args.reference_steps,
                  "metric": "fd" if exact is not None else "rmse"}
    sch = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
    spec = TeacherSpec.for_denoiser(teacher, [StudentGrid(sch, 2)], num_trajectories=args.train + args.val,
                                    shard_size=args.train + args.val, sub_steps=args.teacher_steps - 1, solver="heun",
                                    dtype="float64")
    shard = generate_shard(teacher, spec, 0)
    x0, y = shard.noise.double(), shard.states[-1].double()
    tr, va = slice(0, args.train), slice(args.train, args.train + args.val)
    for nfe in [int(v) for v in args.nfes.split(",")]:
        for name, opts in VARIANTS:
            key = f"{name}|{nfe}"
            if key in db["cells"]:
                continue
            config = F.gs.config_for(teacher, nfe, **opts)
            init = GSParams.reference_init(config)
            with torch.no_grad():
                x_init = F.gs.GSSampler(init, F.gs.spec_doc(init))(teacher, noise).x
            t = time.perf_counter()
            s, res = F.gs.fit(teacher, x0[tr], y[tr], GSTrainConfig(iterations=args.iterations, dtype="float32"),
                              nfe=nfe, config=config, val=(x0[va], y[va]))
            fit_s = time.perf_counter() - t
            with torch.no_grad():
                x = s(teacher, noise).x
                mt = s.params.model_times()
            db["cells"][key] = {"variant": name, "nfe": nfe, "options": opts, "seconds": fit_s,
                                "init": _scores(x_init, ref, exact), "trained": _scores(x, ref, exact),
                                "initial_val": res.initial_val, "best_val": res.best_val,
                                "best_iteration": res.best_iteration, "finite": bool(torch.isfinite(x).all()),
                                "model_times_outside": int(((mt < config.t_eps) | (mt > 1)).sum())}
            atomic_write_bytes(path, json.dumps(db, indent=1).encode())
            print(f"{key}: init {db['cells'][key]['init'].get('fd', db['cells'][key]['init']['rmse']):.4g} -> "
                  f"{db['cells'][key]['trained'].get('fd', db['cells'][key]['trained']['rmse']):.4g} ({fit_s:.0f} s)",
                  flush=True)


def table(db) -> str:
    metric = db["meta"]["metric"]
    lines = [f"teacher {db['meta']['teacher']}: {metric} of {db['meta']['n']} samples, per-sample RMSE to a "
             f"{db['meta']['reference_steps']}-step DPM-Solver++(3M) solution; GS trained {db['meta']['iterations']} "
             f"iterations on {db['meta']['train']} pairs",
             f"| NFE | variant | {metric} at init | {metric} trained | ratio to reference (trained) | RMSE trained | "
             "p99 trained | best val loss | model times outside [t_eps, 1] |",
             "|---|---|---|---|---|---|---|---|---|"]
    cells = db["cells"]
    for nfe in sorted({c["nfe"] for c in cells.values()}):
        base = cells.get(f"reference|{nfe}")
        s4s = cells.get(f"s4s (reference)|{nfe}")
        for name, _ in VARIANTS:
            c = cells.get(f"{name}|{nfe}")
            if c is None:
                continue
            peer = s4s if name.startswith("s4s") else base
            ratio = c["trained"][metric] / peer["trained"][metric] if peer else float("nan")
            lines.append(f"| {nfe} | {name} | {c['init'][metric]:.4g} | {c['trained'][metric]:.4g} | {ratio:.3f} | "
                         f"{c['trained']['rmse']:.4g} | {c['trained']['ps_p99']:.4g} | {c['best_val']:.4g} | "
                         f"{c['model_times_outside']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="digits-gmm")
    ap.add_argument("--json", default="bench/gs_fixes_gmm.json")
    ap.add_argument("--nfes", default="4,6")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--sample-seed", type=int, default=12345)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--train", type=int, default=1400)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--teacher-steps", type=int, default=64)
    ap.add_argument("--reference-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the tables of these result files")
    args = ap.parse_args(argv)
    if args.table:
        for f in args.table:
            print(table(json.loads(Path(f).read_text())), "\n")
        return 0
    torch.set_num_threads(args.threads)
    run(args)
    print(table(json.loads(Path(args.json).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
