"""AMED quality on digits-gmm: each AMED variant x NFE x training seed, next to the base solvers at the same NFE.

    .venv/bin/python bench/amed_quality.py --variants amed:5,7 amed+ipndm:3,5,7 --seeds 0,1,2 --json bench/amed_quality.json

Scores (as in the issue): FD of n samples (noise seeds 12345..) against n exact mixture samples, RMSE of the
first --rmse-samples against the near-exact ODE solution (amed_core.evaluate.reference_solution), training
seconds. Each finished run is appended to --json at once, and runs already there are skipped, so the bench
can be stopped and resumed (the machine is shared). --preset picks the training recipe(s): "reference"
(TrainConfig.reference(), AFS estimate kept in the multistep history) and/or "improved"
(TrainConfig.improved(), afs_in_history=False).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from amed_core.amed import PredictorConfig, Sampler, SamplerSpec, TrainConfig, train_amed
from amed_core.amed.evaluation import sample_amed
from amed_core.adapters import load_teacher
from amed_core.evaluate import exact_samples, reference_solution, sample_solver, seeded_noise
from amed_core.io import atomic_write_bytes
from amed_core.metrics import fd_to_samples, rmse
from amed_core.schedules import ScheduleSpec

# The reference's recipes (launch.sh): AMED-Solver on time_uniform rho=1 with scale_dir 0.01; plugins on
# EDM's polynomial rho=7 with scale_dir 0.01 (+ scale_time 0.2 for iPNDM, its CIFAR-10 setting).
SCHEDULES = {"amed": ScheduleSpec("time_uniform", rho=1.0), "amed+dpmpp": ScheduleSpec("logsnr", rho=1.0)}
SCALE_TIME = {"amed+ipndm": 0.2}
BASELINES = ["euler", "ipndm", "dpm2", "dpmpp", "unipc"]


def _save(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def spec_for(denoiser, variant: str, nfe: int, preset: str) -> SamplerSpec:
    multistep = variant in ("amed+ipndm", "amed+dpmpp")
    return SamplerSpec.create(
        variant, nfe, afs=True, schedule=SCHEDULES.get(variant, ScheduleSpec("polynomial", rho=7.0)),
        predictor=PredictorConfig(scale_dir=0.01, scale_time=SCALE_TIME.get(variant, 0.0)),
        afs_in_history=PRESETS[preset][1] if multistep else None, denoiser=denoiser)


# preset -> (training recipe, afs_in_history for multistep plugins); the last two are ablations of "improved".
PRESETS = {
    "reference": ("reference", True),
    "improved": ("improved", False),
    "relative-only": ("improved", True),
    "history-only": ("reference", False),
}


def config_for(variant: str, preset: str, seed: int, trajectories: int) -> TrainConfig:
    if PRESETS[preset][0] == "reference":
        return TrainConfig.reference(seed=seed, num_trajectories=trajectories)
    return TrainConfig.improved(variant, seed=seed, num_trajectories=trajectories)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["amed:5,7", "amed+ipndm:3,5,7"],
                    help="VARIANT:NFE,NFE,... (NFE odd: AFS is on, as in the reference); e.g. amed+dpm:3,5,7,9")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds")
    ap.add_argument("--preset", default="improved",
                    help="comma-separated: improved, reference, relative-only, history-only (ablations)")
    ap.add_argument("--trajectories", type=int, default=10_000, help="teacher trajectories per training run")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="training-free solvers at the same NFEs")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--sample-seed", type=int, default=12345)
    ap.add_argument("--rmse-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--json", default="bench/amed_quality.json")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the merged table of these result files")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.table:
        merged = {"runs": {}, "baselines": {}}
        for f in args.table:
            d = json.loads(Path(f).read_text())
            merged["runs"].update(d["runs"])
            merged["baselines"].update(d["baselines"])
            merged.setdefault("meta", d.get("meta", {}))
        print(format_table(merged))
        return 0

    teacher = load_teacher("digits-gmm")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = json.loads(path.read_text()) if path.exists() else {"runs": {}, "baselines": {}}
    noise = seeded_noise(range(args.sample_seed, args.sample_seed + args.n), teacher.shape)
    exact = exact_samples(teacher, args.n, args.sample_seed)
    m = min(args.rmse_samples, args.n)
    ref = reference_solution(teacher, noise[:m])
    db["meta"] = {"teacher": "digits-gmm", "n": args.n, "sample_seed": args.sample_seed, "rmse_samples": m,
                  "fd_floor": fd_to_samples(exact_samples(teacher, args.n, args.sample_seed + 1), exact)}

    for p in args.preset.split(","):
        if p not in PRESETS:
            raise SystemExit(f"--preset: unknown {p!r}; choose from {', '.join(PRESETS)}")
    plan = []
    for item in args.variants:
        variant, _, nfes = item.partition(":")
        for nfe in [int(v) for v in nfes.split(",")]:
            for preset in args.preset.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    plan.append((variant, nfe, preset, seed))
    nfes_all = sorted({p[1] for p in plan})

    # Baselines first (cheap): each solver at each NFE, AFS only where needed, plus iPNDM with AFS (the column).
    for solver in [b for b in args.baselines.split(",") if b]:
        for nfe in nfes_all:
            for afs in ([None, True] if solver == "ipndm" else [None]):
                key = f"{solver}{'+afs' if afs else ''}|{nfe}"
                if key in db["baselines"]:
                    continue
                try:
                    run = sample_solver(teacher, solver, nfe, args.n, args.sample_seed, noise=noise, afs=afs)
                except ValueError as e:
                    print(f"skip {key}: {e}", file=sys.stderr)
                    continue
                db["baselines"][key] = {"solver": solver, "nfe": nfe, "afs": run.afs, "num_steps": run.num_steps,
                                        "fd": fd_to_samples(run.x, exact), "rmse": rmse(run.x[:m], ref)}
                _save(path, db)
                print(f"baseline {key}: FD {db['baselines'][key]['fd']:.3f}", flush=True)

    for k, (variant, nfe, preset, seed) in enumerate(plan):
        key = f"{variant}|{nfe}|{preset}|{seed}|{args.trajectories}"
        if key in db["runs"]:
            continue
        spec = spec_for(teacher, variant, nfe, preset)
        cfg = config_for(variant, preset, seed, args.trajectories)
        t0 = time.perf_counter()
        res = train_amed(teacher, spec, cfg)
        train_s = time.perf_counter() - t0
        run = sample_amed(Sampler(spec, res.predictor), teacher, args.n, args.sample_seed, noise=noise)
        db["runs"][key] = {"variant": variant, "nfe": nfe, "preset": preset, "seed": seed, "trajectories": args.trajectories,
                           "fd": fd_to_samples(run.x, exact), "rmse": rmse(run.x[:m], ref), "train_seconds": train_s,
                           "sample_seconds": run.seconds, "num_steps": spec.num_steps, "teacher_nfe": res.teacher_nfe,
                           "final_losses": res.losses[-1]}
        _save(path, db)
        print(f"[{k + 1}/{len(plan)}] {key}: FD {db['runs'][key]['fd']:.3f}, RMSE {db['runs'][key]['rmse']:.4f}, "
              f"train {train_s:.0f} s", flush=True)

    print()
    print(format_table(db))
    return 0


def format_table(db) -> str:
    """Markdown: one row per (variant, NFE, preset, trajectories) with mean +- std over seeds; baselines per NFE."""
    groups: dict = {}
    for r in db["runs"].values():
        groups.setdefault((r["variant"], r["nfe"], r["preset"], r["trajectories"]), []).append(r)
    lines = ["| sampler | NFE | recipe | trajectories | seeds | FD (mean +- std) | FD per seed | RMSE (mean) | train s (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (v, nfe, preset, traj), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        fd = np.array([r["fd"] for r in rs])
        lines.append(f"| {v} | {nfe} | {preset} | {traj} | {len(rs)} | {fd.mean():.3f} +- {fd.std():.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in fd)} | {np.mean([r['rmse'] for r in rs]):.4f} | "
                     f"{np.mean([r['train_seconds'] for r in rs]):.0f} |")
    nfes = sorted({b["nfe"] for b in db["baselines"].values()})
    names = sorted({k.split("|")[0] for k in db["baselines"]})
    if nfes:
        lines += ["", "| base solver (FD / RMSE) | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for name in names:
            cells = []
            for n in nfes:
                b = db["baselines"].get(f"{name}|{n}")
                cells.append(f"{b['fd']:.3f} / {b['rmse']:.4f}" if b else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    meta = db.get("meta", {})
    if meta:
        lines += ["", f"FD on {meta['n']} samples vs {meta['n']} exact mixture samples (noise floor: FD of a second "
                      f"exact set = {meta['fd_floor']:.3f}); RMSE on {meta['rmse_samples']} samples vs the near-exact ODE solution."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
