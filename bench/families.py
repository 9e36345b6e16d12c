"""Method families on one teacher under one protocol: the training-free panel, GITS, AMED, EPD and GS at NFE 3/5/7/9
(GS: --nfes 3,4,5,6,8, the issue's).

    .venv/bin/python bench/families.py --teacher digits-gmm --json bench/families_gmm.json
    .venv/bin/python bench/families.py --teacher digits-tiny-unet --json bench/families_unet.json --n 256 \
        --trajectories 512 --reference-steps 100
    .venv/bin/python bench/families.py --teacher gmm:bench/patches-gmm.npz --json bench/families_patches.json
    .venv/bin/python bench/families.py --table bench/families_gmm.json bench/families_unet.json   # print only
    .venv/bin/python bench/families.py --teacher photos-tiny-unet --json bench/families_photos.json --n 128 \
        --seeds 0 --trajectories 256 --expand ipndm,dpmpp,deis,unipc   # the panel expanded over schedules

The teacher is an argument (any name ``load_teacher`` knows: a mixture, ``digits-tiny-unet``, ``edm-safetensors:DIR``,
``py:...``); --families picks the families to run (the cells already in --json are kept).

Scores: digits-gmm: FD of --n samples (noise seeds 12345..) to --n exact mixture samples (the noise floor is
printed); every teacher: RMSE to a near-exact solution of the same noise (DPM-Solver++ 3M on --reference-steps logSNR
points, float64) with the per-sample RMSE median / p90 / p99. Learned families (3 training seeds; mean +- std):
- GITS: gits+ipndm, the DP over a 41-point polynomial teacher grid on 256 warm-up trajectories (seed s uses
  trajectories 256 s .. 256 s + 255 of one stored teacher), no AFS;
- AMED: amed+ipndm with the improved recipe (TrainConfig.improved, afs_in_history False, scale_time 0.2), AFS on at
  odd NFEs (2 evaluations per step: even NFEs run without);
- EPD: epd+ipndm (K = 2, batched), AFS on at odd NFEs, relative loss weighting, lr --epd-lr, --epd-epochs passes over
  --trajectories stored trajectories at its grid (heun teacher, --epd-teacher-m sub-steps).
- GS: the generalized solver (amed_core.methods.gs) with the reference's configuration (theory mode, order = NFE,
  t_eps 1e-3) and training recipe (Adam 1e-3, batch 24, EMA 0.999, clip 1.0; --gs-iterations), on --gs-train pairs of an
  endpoint-only Heun teacher (--gs-teacher-steps steps), the best EMA checkpoint on --gs-val held-out pairs; two
  initialisations: gs-ref (the reference's time-uniform grid) and gs-panel (the schedule of this table's best free
  entry at that NFE that GS can express: N + 1 points, no AFS). --gs-dtype float32 is the reference's arithmetic.
NFE is each method's reported count (EPD: the paper's parallel count); ``calls`` = denoiser evaluations per sample;
``fit s`` = the fit's wall seconds per candidate (training; GITS: the DP), under the load stated with the results.
Each finished cell is appended to --json at once and skipped on a rerun (the machine is shared; resume freely).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from amed_core import families as F
from amed_core.amed import PredictorConfig, Sampler, SamplerSpec, TrainConfig, train_amed
from amed_core.adapters import load_teacher
from amed_core.evaluate import exact_samples, reference_solution, sample_solver, seeded_noise
from amed_core.evaluate.score import per_sample_summary
from amed_core.io import atomic_write_bytes
from amed_core.metrics import fd_to_samples
from amed_core.methods.epd import EPDTrainConfig
from amed_core.methods.gs import GSTrainConfig
from amed_core.schedules import ScheduleSpec
from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard, shard_to_batches

PANEL = [("ipndm", False), ("ipndm", True), ("dpmpp", False), ("deis", False), ("unipc", False), ("heun", None)]
POLY = ScheduleSpec("polynomial", rho=7.0)


def _save(path: Path, db) -> None:
    atomic_write_bytes(path, json.dumps(db, indent=1).encode())


def _scores(x: torch.Tensor, ctx: dict) -> dict:
    x = x.to(torch.float64)
    per = ((x - ctx["ref"]) ** 2).reshape(x.shape[0], -1).mean(dim=1).sqrt()
    out = {"rmse": float(((x - ctx["ref"]) ** 2).mean().sqrt()), **{f"ps_{k}": v for k, v in per_sample_summary(per).items()},
           "errors": [float(f"{v:.6g}") for v in per.tolist()]}  # per-sample RMSE: the margin's interval (table)
    if ctx.get("exact") is not None:
        out["fd"] = fd_to_samples(x, ctx["exact"])
    return out


def _batched(sampler, teacher, noise, batch: int = 1024):
    xs, calls = [], 0
    for lo in range(0, noise.shape[0], batch):
        res = sampler(teacher, noise[lo:lo + batch])
        xs.append(res.x)
        calls = int(res.nfe)
    return torch.cat(xs), calls


def _shard(teacher, grid: StudentGrid, n: int, M: int, cache: dict):
    key = (grid.schedule.to_json() if hasattr(grid.schedule, "to_json") else str(grid.schedule), grid.num_steps, n, M)
    if key not in cache:
        spec = TeacherSpec.for_denoiser(teacher, [grid], num_trajectories=n, shard_size=n, sub_steps=M, solver="heun",
                                        dtype="float64")
        cache[key] = generate_shard(teacher, spec, 0)
    return cache[key]


def _gs_panel_init(db: dict, teacher, nfe: int, metric: str, config):
    """(sigmas, source) of the best free cell at ``nfe`` GS can express, else ("reference", why)."""
    free_cells = sorted((c for c in db["cells"].values() if c["family"] == "free" and c["nfe"] == nfe
                         and c.get(metric) is not None and math.isfinite(c[metric])), key=lambda c: c[metric])
    for rank, c in enumerate(free_cells):
        s = F.free.make(c["method"], nfe, afs=c["afs"], denoiser=teacher)
        try:
            F.gs.init_params(config, s.spec.sigmas)
        except ValueError:
            continue
        return list(s.spec.sigmas), {"solver": c["method"], "afs": c["afs"], "schedule": c["schedule"], metric: c[metric],
                                     "panel_rank": rank}
    return "reference", {"panel": "no free entry GS can express"}


def run_gs(args, teacher, db, nfes, ctx, done, noise) -> None:
    """GS with the reference's init and with the panel's (after the free cells of each NFE exist)."""
    sch = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
    shard = None
    seeds = [int(s) for s in (args.gs_seeds or args.seeds).split(",")]
    for nfe in nfes:
        for init in args.gs_inits.split(","):
            for seed in seeds:
                key = f"gs|gs-{init}|{nfe}|{seed}"
                if key in db["cells"]:
                    continue
                if shard is None:
                    n = args.gs_train + args.gs_val
                    spec = TeacherSpec.for_denoiser(teacher, [StudentGrid(sch, 2)], num_trajectories=n, shard_size=n,
                                                    sub_steps=args.gs_teacher_steps - 1, solver="heun", dtype="float64")
                    t = time.perf_counter()
                    shard = generate_shard(teacher, spec, 0)
                    db["gs_teacher_seconds"] = time.perf_counter() - t
                labels = shard.one_hot_labels(torch.float64) if shard.label_dim else None
                tr, va = slice(0, args.gs_train), slice(args.gs_train, args.gs_train + args.gs_val)
                x0, y = shard.noise.double(), shard.states[-1].double()
                config = F.gs.config_for(teacher, nfe)
                F.gs.check_start(config, float(teacher.sigma_max))
                start, source = "reference", None
                if init == "panel":
                    start, source = _gs_panel_init(db, teacher, nfe, db["meta"]["metric"], config)
                cfg = GSTrainConfig(iterations=args.gs_iterations, seed=seed, dtype=args.gs_dtype)
                t = time.perf_counter()
                s, res = F.gs.fit(teacher, x0[tr], y[tr], cfg, nfe=nfe, config=config, init=start, init_source=source,
                                  class_labels=None if labels is None else labels[tr],
                                  val=(x0[va], y[va], None if labels is None else labels[va]))
                fit_s = time.perf_counter() - t
                x, calls = _batched(s, teacher, noise)
                done(key, {"family": "gs", "method": f"gs-{init}", "nfe": nfe, "calls": calls, "seconds": fit_s,
                           "iterations": cfg.iterations, "ms_per_iteration": 1000 * fit_s / cfg.iterations,
                           "initial_val": res.initial_val, "best_val": res.best_val, "best_iteration": res.best_iteration,
                           "init": s.spec.init.get("source") or {"kind": s.spec.init["kind"]},
                           "sigmas": list(s.spec.sigmas), "model_sigmas": list(s.spec.doc["model_sigmas"]),
                           **_scores(x, ctx)})


def run(args) -> None:
    teacher = load_teacher(args.teacher)
    path = Path(args.json)
    db = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    noise = seeded_noise(range(args.sample_seed, args.sample_seed + args.n), teacher.shape)
    t0 = time.perf_counter()
    ctx = {"ref": reference_solution(teacher, noise, num_steps=args.reference_steps).to(torch.float64)}
    exact = None
    if hasattr(teacher, "sample"):
        exact = exact_samples(teacher, args.n, args.sample_seed)
        ctx["exact"] = exact
        db["fd_floor"] = fd_to_samples(exact_samples(teacher, args.n, args.sample_seed + 1), exact)
    db["meta"] = {"teacher": args.teacher, "n": args.n, "sample_seed": args.sample_seed, "trajectories": args.trajectories,
                  "reference_steps": args.reference_steps, "reference_seconds": time.perf_counter() - t0,
                  "metric": "fd" if exact is not None else "rmse"}
    _save(path, db)
    nfes = [int(v) for v in args.nfes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    sch = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
    shards: dict = {}

    def done(key, cell):
        db["cells"][key] = cell
        _save(path, db)
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in cell.items() if k in ("fd", "rmse", "ps_p99", "calls", "seconds")}
        print(f"{key}: {shown}", flush=True)

    families = set(args.families.split(","))
    for nfe in nfes:  # the panel (deterministic)
        for solver, afs in PANEL:
            key = f"free|{solver}{'+afs' if afs else ''}|{nfe}|-"
            if key in db["cells"]:
                continue
            try:
                t = time.perf_counter()
                r = sample_solver(teacher, solver, nfe, args.n, args.sample_seed, noise=noise, afs=afs)
            except ValueError as e:
                print(f"skip {key}: {e}", file=sys.stderr)
                continue
            done(key, {"family": "free", "method": solver, "afs": r.afs, "nfe": nfe, "calls": nfe,
                       "schedule": r.schedule.schedule_type, "seconds": time.perf_counter() - t, **_scores(r.x, ctx)})
        for solver in [s for s in args.expand.split(",") if s]:  # the panel expanded over schedules, AFS, thresholding
            for o in F.free.option_sets(solver, nfe):
                opts = {k: v for k, v in o["options"].items() if k == "dynamic_thresholding"}
                sched = f"{o['schedule'].schedule_type}{o['schedule'].rho:g}"
                key = f"free|{solver}{'+afs' if o['afs'] else ''}|{nfe}|{sched}{''.join(f',dt={v}' for v in opts.values())}"
                if key in db["cells"]:
                    continue
                t = time.perf_counter()
                schedule = ScheduleSpec(o["schedule"].schedule_type, rho=o["schedule"].rho,
                                        sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
                r = sample_solver(teacher, solver, nfe, args.n, args.sample_seed, schedule, opts, noise=noise,
                                  afs=o["afs"])
                done(key, {"family": "free", "method": f"{solver}[{sched}{',dt' if opts.get('dynamic_thresholding') else ''}]",
                           "afs": r.afs, "nfe": nfe, "calls": nfe, "schedule": sched, "options": opts,
                           "seconds": time.perf_counter() - t, **_scores(r.x, ctx)})
    if "gs" in families:
        run_gs(args, teacher, db, nfes, ctx, done, noise)
    gits_shard = _shard(teacher, StudentGrid(sch, 41), 256 * len(seeds), 1, shards) if "gits" in families else None
    for nfe in nfes if gits_shard is not None else ():
        for seed in seeds:
            key = f"gits|gits+ipndm|{nfe}|{seed}"
            if key in db["cells"]:
                continue
            t = time.perf_counter()
            lo = 256 * seeds.index(seed)
            labels = gits_shard.one_hot_labels(torch.float64) if gits_shard.label_dim else None
            s = F.gits.fit(teacher, gits_shard.states[:, lo:lo + 256], gits_shard.sigmas, method="gits+ipndm", nfe=nfe,
                           class_labels=None if labels is None else labels[lo:lo + 256], warmup=None)
            fit_s = time.perf_counter() - t
            x, calls = _batched(s, teacher, noise)
            done(key, {"family": "gits", "method": "gits+ipndm", "nfe": nfe, "calls": calls, "seconds": fit_s,
                       "sigmas": list(s.spec.sigmas), **_scores(x, ctx)})
    for nfe in nfes if "amed" in families else ():
        for seed in seeds:
            key = f"amed|amed+ipndm|{nfe}|{seed}"
            if key in db["cells"]:
                continue
            spec = SamplerSpec.create("amed+ipndm", nfe, afs=nfe % 2 == 1, schedule=POLY, predictor=PredictorConfig(
                scale_dir=0.01, scale_time=0.2), afs_in_history=False, denoiser=teacher)
            cfg = TrainConfig.improved("amed+ipndm", seed=seed, num_trajectories=args.trajectories)
            t = time.perf_counter()
            res = train_amed(teacher, spec, cfg)
            fit_s = time.perf_counter() - t
            x, calls = _batched(Sampler(spec, res.predictor), teacher, noise)
            done(key, {"family": "amed", "method": "amed+ipndm", "nfe": nfe, "calls": calls, "seconds": fit_s,
                       **_scores(x, ctx)})
    for nfe in nfes if "epd" in families else ():
        for seed in seeds:
            key = f"epd|epd+ipndm|{nfe}|{seed}"
            if key in db["cells"]:
                continue
            from amed_core.methods import num_steps_for

            afs = nfe % 2 == 1  # 2 (N - 1) - afs: AFS only where the NFE is odd
            N = num_steps_for("epd+ipndm", nfe, afs)
            shard = _shard(teacher, StudentGrid(sch, N), args.trajectories, args.epd_teacher_m, shards)
            grid = sch.grid(N)
            cfg = EPDTrainConfig(solver="epd+ipndm", afs=afs, seed=seed, loss_weighting="relative", lr=args.epd_lr)
            t = time.perf_counter()
            batches = list(shard_to_batches(shard, grid, batch_size=128)) * args.epd_epochs  # the seed: the tables' init
            s, _ = F.epd.fit(teacher, grid, batches, cfg, nfe=nfe)
            fit_s = time.perf_counter() - t
            x, calls = _batched(s, teacher, noise)
            done(key, {"family": "epd", "method": "epd+ipndm", "nfe": nfe, "calls": calls, "seconds": fit_s,
                       **_scores(x, ctx)})


def _ms(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return m, sd


def _interval(champ: list, free: list | None) -> str:
    """The champion / best-free RMSE ratio's 95 % interval over noise seeds (paired bootstrap over samples; seed-0
    cell of each) and its verdict; empty when the cells hold no per-sample errors."""
    from amed_core.evaluate import margin_interval, verdict

    if not free or "errors" not in champ[0] or "errors" not in free[0] or champ[0] is free[0]:
        return ""
    ci = margin_interval(torch.tensor(champ[0]["errors"]), torch.tensor(free[0]["errors"]))
    return f" (95 % interval {ci[0]:.3f}-{ci[1]:.3f}: {verdict(ci)})"


def _learned(best_per_family: dict, free) -> str:
    """The best learned family's ratio to the best free sampler, with its interval (seed-0 cells)."""
    learned = [(f, v) for f, v in best_per_family.items() if f != "free"]
    if not learned or not free:
        return ""
    fam, (name, m, _, cs) = min(learned, key=lambda kv: kv[1][1])
    return f"; best learned {fam}:{name} {m:.4g}, ratio {m / free[1]:.3f}" + _interval(cs, free[3])


def table(db, only_nfes=None) -> str:
    metric = db["meta"]["metric"]
    cells = db["cells"].values()
    nfes = sorted({c["nfe"] for c in cells if only_nfes is None or c["nfe"] in only_nfes})
    lines = [f"teacher {db['meta']['teacher']}: {metric} of {db['meta']['n']} samples"
             + (f" (noise floor {db['fd_floor']:.4f})" if "fd_floor" in db else "")
             + f"; per-sample RMSE to a {db['meta']['reference_steps']}-step DPM-Solver++(3M) solution",
             "| NFE | family | method | calls | " + metric + " (mean ± std) | RMSE | p50 | p90 | p99 | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for nfe in nfes:
        groups: dict = {}
        for c in cells:
            if c["nfe"] == nfe:
                name = c["method"] + ("+afs" if c.get("afs") and c["family"] == "free" and c["method"] != "heun" else "")
                groups.setdefault((c["family"], name), []).append(c)
        best_per_family = {}
        for (fam, name), cs in groups.items():
            m, sd = _ms([c[metric] for c in cs])
            if m is None:
                continue
            row = name if fam == "gs" else fam  # GS: one row per initialisation
            if row not in best_per_family or m < best_per_family[row][1]:
                best_per_family[row] = (name, m, sd, cs)
        for row in ("free", "gits", "amed", "epd", "gs-ref", "gs-panel"):
            if row not in best_per_family:
                continue
            name, m, sd, cs = best_per_family[row]
            fam = cs[0]["family"]
            r = [_ms([c[k] for c in cs])[0] for k in ("rmse", "ps_median", "ps_p90", "ps_p99")]
            fit = _ms([c.get("seconds") for c in cs])[0] if fam != "free" else None
            lines.append(f"| {nfe} | {fam}{' (best of the panel)' if fam == 'free' else ''} | {name} | {cs[0]['calls']} | "
                         f"{m:.4g} ± {sd:.2g} | " + " | ".join(f"{v:.4g}" for v in r)
                         + f" | {'-' if fit is None else f'{fit:.0f}'} |")
        if best_per_family:
            champ = min(best_per_family.items(), key=lambda kv: kv[1][1])
            free = best_per_family.get("free")
            ipndm = groups.get(("free", "ipndm"))
            gits = best_per_family.get("gits")
            gs_rows = [f"{k} {best_per_family[k][1]:.4g}" for k in ("gs-ref", "gs-panel") if k in best_per_family]
            summary.append(f"NFE {nfe}: champion {champ[1][3][0]['family']}:{champ[1][0]} {champ[1][1]:.4g}"
                           + (f"; GS {', '.join(gs_rows)}" if gs_rows else "")
                           + (f", best free {free[0]} {free[1]:.4g}, ratio {champ[1][1] / free[1]:.3f}" if free else "")
                           + _interval(champ[1][3], free[3] if free else None)
                           + _learned(best_per_family, free)
                           + (f"; GITS+iPNDM {gits[1]:.4g} vs iPNDM (poly7) {_ms([c[metric] for c in ipndm])[0]:.4g}"
                              if gits and ipndm else ""))
    return "\n".join(lines + [""] + summary)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="digits-gmm")
    ap.add_argument("--json", default="bench/families_gmm.json")
    ap.add_argument("--nfes", default="3,5,7,9")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=4096, help="samples per cell")
    ap.add_argument("--sample-seed", type=int, default=12345)
    ap.add_argument("--trajectories", type=int, default=4096, help="teacher trajectories per AMED / EPD training run")
    ap.add_argument("--epd-teacher-m", type=int, default=4, help="teacher sub-steps of EPD's stored teacher")
    ap.add_argument("--epd-epochs", type=int, default=8, help="EPD: passes over its stored teacher")
    ap.add_argument("--epd-lr", type=float, default=5e-2,
                    help="EPD: Adam lr (the reference's 5e-3 needs ~24 passes from its random init on digits-gmm)")
    ap.add_argument("--families", default="free,gits,amed,epd,gs", help="families to run (free always: the panel)")
    ap.add_argument("--gs-iterations", type=int, default=10_000, help="GS: optimiser steps (the reference's 10,000)")
    ap.add_argument("--gs-train", type=int, default=1400, help="GS: training pairs (the reference's train_size)")
    ap.add_argument("--gs-val", type=int, default=1000, help="GS: held-out pairs (the reference's validation_size)")
    ap.add_argument("--gs-teacher-steps", type=int, default=64, help="GS: Heun steps of its endpoint-only teacher")
    ap.add_argument("--gs-inits", default="ref,panel", help="GS: initialisations (ref: the reference's grid; panel: the "
                    "best free entry's schedule GS can express)")
    ap.add_argument("--gs-seeds", default=None, help="GS: training seeds (default: --seeds)")
    ap.add_argument("--gs-dtype", choices=["float32", "float64"], default=None,
                    help="GS: the student's arithmetic (default: the teacher data's, float64; the reference: float32)")
    ap.add_argument("--reference-steps", type=int, default=200)
    ap.add_argument("--expand", default="", help="panel solvers expanded over every option set (schedules polynomial 7 / "
                    "logSNR / time-uniform, AFS, thresholding), e.g. ipndm,dpmpp,deis,unipc")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the tables of these result files")
    ap.add_argument("--table-nfes", default=None, help="with --table: only these NFEs (e.g. 3,4,5,6,8)")
    args = ap.parse_args(argv)
    if args.table:
        only = {int(v) for v in args.table_nfes.split(",")} if args.table_nfes else None
        for f in args.table:
            print(table(json.loads(Path(f).read_text()), only), "\n")
        return 0
    torch.set_num_threads(args.threads)
    run(args)
    print(table(json.loads(Path(args.json).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
