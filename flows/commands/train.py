"""`amed train`: fit one sampler of a family to a teacher and write a checkpoint directory.

    amed train --teacher digits-gmm --solver amed --nfe 5 --seed 0 --out runs/amed-nfe5
    amed train --method gits --solver ipndm --nfe 5 --teacher digits-gmm --out runs/gits-ipndm-nfe5
    amed train --method epd --solver ipndm --nfe 5 --teacher digits-gmm --out runs/epd-ipndm-nfe5
    amed train --method gs --nfe 4 --teacher digits-gmm --out runs/gs-nfe4 [--gs-init panel]

--method amed (default): an AMED predictor; gits: a GITS schedule for a training-free --solver, selected by DP from a
fine teacher grid (--gits-grid points, --trajectories warm-up trajectories, default 256); the checkpoint is
sampler.json only; epd: EPD tables (--solver epd | epd+ipndm, or heun / ipndm for those) trained on a stored teacher
at the student grid; gs: GS (the generalized solver: grid, model times and coefficients) trained on the final
samples of an endpoint-only teacher (--trajectories training pairs, --val held-out pairs). Every checkpoint loads with
``amed_core.families.load_sampler``.

The math lives in amed_core.amed (train_amed); this command parses options, shows progress (tqdm),
and writes predictor.safetensors + sampler.json (+ train.json with the config and loss history).
"""

from __future__ import annotations

import json
from pathlib import Path

from amed_core.methods import get_method, method_names

# The AMED methods (the method table's "amed" family); each one's default schedule is the table's (the reference's:
# AMED-Solver on time_uniform rho=1, DPM-Solver++ on logSNR, the rest on EDM's polynomial rho=7).
SOLVER_CHOICES = list(method_names("amed"))
METHOD_CHOICES = ("amed", "gits", "epd", "gs")
EPD_FOR = {"epd": "epd", "epd+ipndm": "epd+ipndm", "heun": "epd", "ipndm": "epd+ipndm"}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an AMED predictor (AMED-Solver or AMED-Plugin) against a teacher",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="digits-gmm or gmm:PATH.npz (a mixture file with weights, means, covs, shape)")
    p.add_argument("--method", choices=METHOD_CHOICES, default="amed",
                   help="family: amed (default), gits (a schedule for a training-free solver), epd, gs")
    p.add_argument("--solver", default=None,
                   help=f"amed: {', '.join(SOLVER_CHOICES)}; gits: a training-free solver ({', '.join(method_names('free'))}); "
                        f"epd: epd, epd+ipndm (or heun, ipndm); gs: none (gs)")
    p.add_argument("--gs-init", choices=["reference", "panel"], default="reference",
                   help="gs: start from the reference's time-uniform grid, or from the training-free schedule GS can "
                        "express (N + 1 points, no AFS) with the lowest loss on the held-out pairs")
    p.add_argument("--gs-options", default="{}", metavar="JSON",
                   help='gs: GSConfig fields, e.g. \'{"order": 3, "theory": false, "end": "net", "output": "edm"}\' '
                        "(defaults: the reference's; amed_core.methods.gs.GSConfig)")
    p.add_argument("--iterations", type=int, default=None, help="gs: optimiser steps (default 10000, the reference's)")
    p.add_argument("--val", type=int, default=None, help="gs: held-out teacher pairs (default 1000)")
    p.add_argument("--loss", default="l2", help="gs: l2 (default) or py:package.module:function returning a distance")
    p.add_argument("--gits-grid", type=int, default=41, help="gits: points of the fine teacher grid (polynomial rho 7)")
    p.add_argument("--gits-metric", choices=["dev", "l1", "l2"], default="dev", help="gits: cost metric")
    p.add_argument("--gits-coeff", type=float, default=1.15, help="gits: DP coefficient")
    p.add_argument("--epochs", type=int, default=None, help="epd: passes over the stored teacher (default 8; reference 1)")
    p.add_argument("--nfe", required=True, type=int, help="denoiser evaluations per sample (N follows: NFE = 2(N-1) - afs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--afs", choices=["on", "off"], default="on", help="analytical first step (default on; odd NFE needs it)")
    p.add_argument("--schedule", choices=["polynomial", "logsnr", "time_uniform"], default=None,
                   help="time schedule (default: time_uniform for amed, logsnr for amed+dpmpp, polynomial otherwise)")
    p.add_argument("--rho", type=float, default=None, help="schedule exponent (default 1 for time_uniform, 7 for polynomial)")
    p.add_argument("--scale-dir", type=float, default=0.01, help="direction-scale head half-width s_d (0 = off)")
    p.add_argument("--scale-time", type=float, default=None, help="time-scale head half-width s_t (0 = off; default 0.2 for amed+ipndm, else 0)")
    p.add_argument("--max-order", type=int, default=None, help="amed+ipndm (1-4, default 4) / amed+dpmpp (1-3, default 3)")
    p.add_argument("--predict-x0", choices=["on", "off"], default=None, help="amed+dpmpp: data prediction (default on)")
    p.add_argument("--afs-in-history", choices=["on", "off"], default=None,
                   help="amed+ipndm / amed+dpmpp: keep the AFS estimate in the multistep history "
                        "(default: on with --preset reference, off with --preset improved)")
    p.add_argument("--preset", choices=["reference", "improved"], default="improved",
                   help="training recipe: the reference implementation's, or ours (see TrainConfig.improved)")
    p.add_argument("--trajectories", type=int, default=None, help="teacher trajectories (default 10000)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-3)")
    p.add_argument("--teacher-solver", default=None, help="on-the-fly teacher solver (default: preset's)")
    p.add_argument("--teacher-m", type=int, default=None, help="teacher points inserted per student interval (default: preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build(args):
    """(denoiser, SamplerSpec, TrainConfig) from the parsed options."""
    from amed_core.amed import PredictorConfig, SamplerSpec, TrainConfig
    from amed_core.denoisers import load_teacher
    from amed_core.schedules import ScheduleSpec

    denoiser = load_teacher(args.teacher)
    default = get_method(args.solver).default_schedule
    stype, rho = default.schedule_type, default.rho
    if args.schedule is not None:
        stype, rho = args.schedule, (1.0 if args.schedule == "time_uniform" else 7.0)
    rho = args.rho if args.rho is not None else rho
    schedule = ScheduleSpec(schedule_type=stype, rho=rho, sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
    scale_time = args.scale_time if args.scale_time is not None else (0.2 if args.solver == "amed+ipndm" else 0.0)
    predictor = PredictorConfig(scale_dir=args.scale_dir, scale_time=scale_time)
    predict_x0 = None if args.predict_x0 is None else args.predict_x0 == "on"
    afs_in_history = None
    if "afs_in_history" in get_method(args.solver).options:  # the multistep plugins
        afs_in_history = args.preset == "reference" if args.afs_in_history is None else args.afs_in_history == "on"
    elif args.afs_in_history is not None:
        raise ValueError(f"--afs-in-history applies to amed+ipndm / amed+dpmpp only, not {args.solver}")
    spec = SamplerSpec.create(args.solver, args.nfe, afs=args.afs == "on", schedule=schedule, predictor=predictor,
                              max_order=args.max_order, predict_x0=predict_x0, afs_in_history=afs_in_history,
                              denoiser=denoiser)
    overrides = {k: v for k, v in dict(seed=args.seed, num_trajectories=args.trajectories, batch_size=args.batch,
                                        lr=args.lr, teacher_solver=args.teacher_solver, teacher_M=args.teacher_m).items()
                 if v is not None}
    cfg = TrainConfig.reference(**overrides) if args.preset == "reference" else TrainConfig.improved(args.solver, **overrides)
    return denoiser, spec, cfg


def run(args) -> int:
    if args.method == "gs":
        return run_gs(args)
    if args.solver is None:
        raise ValueError(f"--solver is required with --method {args.method}")
    if args.method == "amed" and args.solver not in SOLVER_CHOICES:
        raise ValueError(f"--solver {args.solver!r}: --method amed takes {', '.join(SOLVER_CHOICES)}")
    if args.method == "gits":
        return run_gits(args)
    if args.method == "epd":
        return run_epd(args)
    from tqdm import tqdm

    from amed_core.amed import save_checkpoint, train_amed
    from amed_core.io import atomic_write_bytes

    denoiser, spec, cfg = build(args)
    out = Path(args.out)
    print(f"training {spec.solver} at NFE {spec.nfe} (N={spec.num_steps}, afs={spec.afs}, "
          f"{spec.schedule.schedule_type} rho={spec.schedule.rho}) on {args.teacher}, preset {args.preset}, "
          f"{cfg.num_trajectories} trajectories x {cfg.epochs} epoch(s), batch {cfg.batch_size}", flush=True)
    total_updates = -(-cfg.num_trajectories // cfg.batch_size) * cfg.epochs * (spec.num_steps - 1)
    bar = tqdm(total=total_updates, unit="step", disable=args.no_progress, dynamic_ncols=True)

    def progress(p):
        bar.update(1)
        bar.set_postfix(traj=p.trajectories, step=p.step, loss=f"{p.loss:.4g}", r=f"{p.r_mean:.3f}")

    result = train_amed(denoiser, spec, cfg, callback=progress)
    bar.close()
    save_checkpoint(out, result.predictor, spec)
    atomic_write_bytes(out / "train.json", (json.dumps({
        "train_config": cfg.to_dict(), "seconds": result.seconds, "updates": result.updates,
        "trajectories": result.trajectories, "teacher_nfe_per_trajectory": result.teacher_nfe,
        "final_losses": result.losses[-1] if result.losses else [],
    }, indent=2) + "\n").encode())
    print(f"wrote {out}/predictor.safetensors, sampler.json, train.json ({result.seconds:.1f} s, {result.updates} updates)")
    return 0


def _teacher_shard(denoiser, schedule, num_steps: int, trajectories: int, M: int, seed: int):
    from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard

    spec = TeacherSpec.for_denoiser(denoiser, [StudentGrid(schedule, num_steps)], num_trajectories=trajectories,
                                    shard_size=trajectories, sub_steps=M, solver="heun", dtype="float64", base_seed=seed)
    return generate_shard(denoiser, spec, 0)


def _write(out: Path, sampler, record: dict) -> None:
    from amed_core.families import describe, save_sampler
    from amed_core.io import atomic_write_bytes

    save_sampler(out, sampler)
    d = {k: v for k, v in describe(sampler).items() if k != "sigmas"}
    atomic_write_bytes(out / "train.json", (json.dumps({**record, "sampler": d}, indent=2) + "\n").encode())
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))}): {d['method']} NFE {d['nfe']}, "
          f"{d['denoiser_calls']} denoiser calls per sample, {d['num_steps']} time points")


def run_gits(args) -> int:
    """GITS: warm-up teacher on a fine polynomial grid, the DP, a sampler.json with the selected sigmas."""
    import time

    from amed_core.denoisers import load_teacher
    from amed_core.families import gits
    from amed_core.schedules import ScheduleSpec

    den = load_teacher(args.teacher)
    base = gits.base_of(args.solver)
    schedule = ScheduleSpec("polynomial", rho=args.rho or 7.0, sigma_min=den.sigma_min, sigma_max=den.sigma_max)
    n = args.trajectories or 256
    t0 = time.perf_counter()
    shard = _teacher_shard(den, schedule, args.gits_grid, n, args.teacher_m or 1, args.seed)
    opts = {"max_order": args.max_order} if args.max_order is not None else {}
    labels = shard.one_hot_labels(torch_dtype()) if shard.label_dim else None
    sampler = gits.fit(den, shard.states, shard.sigmas, method=base, nfe=args.nfe, options=opts,
                       metric=args.gits_metric, coeff=args.gits_coeff, class_labels=labels, warmup=None)
    print(f"GITS for {base} at NFE {args.nfe} on {args.teacher}: sigmas {[round(v, 4) for v in sampler.spec.sigmas]} "
          f"(indices {sampler.spec.fit['dp_list']} of {args.gits_grid})")
    _write(Path(args.out), sampler, {"method": "gits", "seconds": time.perf_counter() - t0, "trajectories": n,
                                     "fit": sampler.spec.fit})
    return 0


def torch_dtype():
    import torch

    return torch.float64


def run_epd(args) -> int:
    """EPD: a stored teacher at the student grid, then train_epd (our recipe: lr 5e-2, 8 passes; --preset reference:
    lr 5e-3, one pass, loss summed)."""
    import time

    from amed_core.denoisers import load_teacher
    from amed_core.families import epd
    from amed_core.methods import get_method, num_steps_for
    from amed_core.methods.epd import EPDTrainConfig
    from amed_core.schedules import ScheduleSpec
    from amed_core.teacher import shard_to_batches

    method = EPD_FOR.get(args.solver)
    if method is None:
        raise ValueError(f"--solver {args.solver!r}: --method epd takes {', '.join(EPD_FOR)}")
    den = load_teacher(args.teacher)
    afs = args.afs == "on"
    steps = num_steps_for(method, args.nfe, afs)
    default = get_method(method).default_schedule
    stype = args.schedule or default.schedule_type
    rho = args.rho if args.rho is not None else (1.0 if stype == "time_uniform" else default.rho)
    schedule = ScheduleSpec(stype, rho=rho, sigma_min=den.sigma_min, sigma_max=den.sigma_max)
    ref = args.preset == "reference"
    n, epochs = args.trajectories or 4096, args.epochs or (1 if ref else 8)
    t0 = time.perf_counter()
    shard = _teacher_shard(den, schedule, steps, n, args.teacher_m or 4, args.seed)
    grid = schedule.grid(steps)
    cfg = EPDTrainConfig(solver=method, afs=afs, seed=args.seed, max_order=args.max_order or 4,
                         scale_dir=args.scale_dir, scale_time=args.scale_time or 0.0,
                         lr=args.lr or (5e-3 if ref else 5e-2), loss_weighting="sum" if ref else "relative")
    batches = list(shard_to_batches(shard, grid, batch_size=args.batch or 128)) * epochs
    sampler, res = epd.fit(den, grid, batches, cfg, nfe=args.nfe)
    _write(Path(args.out), sampler, {"method": "epd", "seconds": time.perf_counter() - t0, "trajectories": n,
                                     "epochs": epochs, "train_config": cfg.to_dict(), "updates": res.updates,
                                     "final_losses": res.losses[-1] if res.losses else []})
    return 0


def run_gs(args) -> int:
    """GS: an endpoint-only teacher (--trajectories training pairs + --val held-out pairs; --teacher-m Heun steps
    between its two stored points, default 64), then train_gs (the reference's recipe: Adam 1e-3, batch 24, 10,000
    iterations, EMA 0.999, the best EMA checkpoint on the held-out pairs). --gs-init panel starts from the schedule of
    the training-free sampler GS can express (DPM-Solver++, iPNDM, DEIS, UniPC, Euler over the panel's schedules, no
    AFS) that lands closest (L2) to the teacher on the held-out pairs; a sweep uses its panel's scores instead."""
    import time

    import torch

    from amed_core.denoisers import load_teacher
    from amed_core.families import gs
    from amed_core.methods.gs import GSTrainConfig
    from amed_core.schedules import ScheduleSpec

    if args.solver not in (None, "gs"):
        raise ValueError(f"--solver {args.solver!r}: --method gs takes no solver (or gs)")
    try:
        options = json.loads(args.gs_options)
    except ValueError as e:
        raise ValueError(f"--gs-options is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise ValueError("--gs-options must be a JSON object of GSConfig fields")
    distance = gs.load_distance(args.loss)  # before any work: a bad loss fails here
    den = load_teacher(args.teacher)
    config = gs.config_for(den, args.nfe, **options)
    gs.check_start(config, float(den.sigma_max))
    n, n_val = args.trajectories or 1400, args.val or 1000
    t0 = time.perf_counter()
    schedule = ScheduleSpec("polynomial", rho=7.0, sigma_min=den.sigma_min, sigma_max=den.sigma_max)
    shard = _teacher_shard(den, schedule, 2, n + n_val, (args.teacher_m or 64) - 1, args.seed)
    noise, final = shard.noise.to(torch.float64), shard.states[-1].to(torch.float64)
    labels = shard.one_hot_labels(torch.float64) if shard.label_dim else None
    tr, va = slice(0, n), slice(n, n + n_val)
    val = (noise[va], final[va], None if labels is None else labels[va])
    init, source = "reference", None
    if args.gs_init == "panel":
        init, source = _gs_panel(den, config, val)
        print(f"GS init: {source}")
    cfg = GSTrainConfig(iterations=args.iterations or 10_000, batch_size=args.batch or 24, lr=args.lr or 1e-3,
                        seed=args.seed, loss=args.loss)
    from tqdm import tqdm

    bar = tqdm(total=cfg.iterations, unit="it", disable=args.no_progress, dynamic_ncols=True)

    def progress(p) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{p.loss:.4g}", **({"val": f"{p.val_loss:.4g}"} if p.val_loss is not None else {}))

    sampler, res = gs.fit(den, noise[tr], final[tr], cfg, nfe=args.nfe, config=config, init=init, init_source=source,
                          class_labels=None if labels is None else labels[tr], val=val,
                          distance=distance, callback=progress)
    bar.close()
    print(f"GS at NFE {args.nfe} on {args.teacher}: validation loss {res.initial_val:.4g} -> {res.best_val:.4g} "
          f"(best at iteration {res.best_iteration} of {cfg.iterations})")
    _write(Path(args.out), sampler, {"method": "gs", "seconds": time.perf_counter() - t0, "trajectories": n,
                                     "val_pairs": n_val, "train_config": cfg.to_dict(), "updates": res.updates,
                                     "val_history": res.val_history, "init": sampler.spec.init})
    return 0


def _gs_panel(den, config, val):
    """(sigmas, source) of the training-free sampler GS can express at its NFE whose samples from the held-out noise
    are closest (mean L2) to the teacher's end states; ("reference", why) when none can be expressed."""
    import torch

    from amed_core.families import free, gs
    from amed_core.methods.gs import l2_distance

    noise, target, labels = val
    best = None
    for solver in ("dpmpp", "ipndm", "deis", "unipc", "euler"):
        for o in free.option_sets(solver, config.steps, afs=(False,)):
            s = free.make(solver, config.steps, schedule=o["schedule"], afs=False, options=o["options"], denoiser=den)
            try:
                gs.init_params(config, s.spec.sigmas)
            except ValueError:
                continue
            with torch.no_grad():
                loss = float(l2_distance(s(den, noise, class_labels=labels).x, target).mean())
            if best is None or loss < best[0]:
                best = (loss, list(s.spec.sigmas), {"solver": solver, "schedule": o["schedule"].schedule_type,
                                                    "options": o["options"], "val_loss": loss})
    if best is None:
        return "reference", {"panel": "no training-free schedule GS can express at this NFE"}
    return best[1], best[2]
