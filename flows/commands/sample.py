"""`amed sample`: sample with training-free solvers on a teacher and print the quality-vs-NFE table.

Writes into --out-dir: ``quality.json`` (the table), ``quality.png`` (FD and RMSE against NFE) and
``samples.png`` (one row per solver at the largest NFE, the last row exact mixture samples).
Any teacher works: one that cannot draw exact samples (a network such as digits-tiny-unet) is scored by
RMSE to the near-exact ODE solution only (FD reads n/a, and the header says so).
The math lives in :mod:`amed_core.evaluate`; this module only parses, prints and writes.
Each mode is one function (``run_base_solvers``); a learned-sampler mode plugs in next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SOLVERS = "euler,heun,dpm2,ipndm,dpmpp,unipc,deis"
DEFAULT_NFES = "3,5,7,9"
SCHEDULE_CHOICES = ("auto", "polynomial", "logsnr", "time_uniform")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="score samplers on a teacher: training-free solvers vs NFE, a trained sampler (--predictor) or the "
                       "training-free panel (--panel)",
        description="Sample a teacher with training-free ODE solvers at several NFEs; print FD to exact "
                    "samples and RMSE to a near-exact ODE solution; write PNGs and a JSON table. With --predictor: a "
                    "trained sampler (a folder, a URL or models:/NAME@ALIAS) next to its base solver at the same NFE. "
                    "With --panel: every option set of --solvers, ranked per NFE. A teacher without exact samples "
                    "(a network) gets RMSE only (FD n/a).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=None,
                   help="digits-gmm, gmm:PATH.npz (mixtures: FD and RMSE), digits-tiny-unet, tiny-unet:DIR, "
                        "edm-safetensors:DIR, ... (networks: RMSE only). Default: digits-gmm; with --predictor the "
                        "built-in teacher the checkpoint was trained for")
    p.add_argument("--solvers", default=DEFAULT_SOLVERS, help="comma-separated solver names")
    p.add_argument("--nfe", default=DEFAULT_NFES, help="comma-separated NFE budgets")
    p.add_argument("--n", type=int, default=4096, help="samples per (solver, NFE)")
    p.add_argument("--seed", type=int, default=12345, help="first noise seed (sample i uses seed + i)")
    p.add_argument("--out-dir", default="amed-sample", help="where the PNGs and quality.json go")
    p.add_argument("--afs", choices=("auto", "on", "off"), default="auto",
                   help="analytical first step; auto = only where an odd NFE needs it (heun, dpm2)")
    p.add_argument("--schedule", choices=SCHEDULE_CHOICES, default="auto",
                   help="time schedule for every solver; auto = the reference's choice per solver")
    p.add_argument("--rho", type=float, default=None, help="schedule exponent (polynomial: 7, time_uniform: 1)")
    p.add_argument("--no-dynamic-thresholding", action="store_true",
                   help="dpmpp/unipc: do not clamp data predictions (the reference clamps them; a mixture's "
                        "samples are not confined to [-1, 1], so clamping biases them)")
    p.add_argument("--rmse-samples", type=int, default=512, help="samples scored against the near-exact solution")
    p.add_argument("--reference-steps", type=int, default=500, help="grid points of the near-exact solution")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--grid-per-row", type=int, default=16, help="samples per solver in samples.png")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default). The mixture's small batched ops gain little "
                        "from threads; on a busy 2-core machine 1 thread ran the default table in 1m16s, 2 in 4m49s")
    p.add_argument("--predictor", default=None, metavar="DIR|URL|models:/NAME@ALIAS",
                   help="a trained AMED checkpoint (amed train --out DIR): score it next to its base solver at the "
                        "same NFE, write predictor-samples.png and policy.png (learned r/scales per step)")
    p.add_argument("--out", default=None, metavar="FILE.npz", help="with --predictor: save the samples as 'samples' (n, C, H, W)")
    p.add_argument("--tracking-uri", default=None,
                   help="with --predictor models:/...: the MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                        "quickstart's sqlite:///amed-runs/quickstart/mlflow.db when it exists in this folder)")
    p.add_argument("--panel", action="store_true",
                   help="the training-free panel: each of --solvers with every option set that reaches the NFE (AFS "
                        "on/off, schedules polynomial rho 7 / logsnr / time_uniform, dynamic thresholding on/off for "
                        "dpmpp/unipc), ranked per NFE by FD (RMSE for networks); writes panel.json")
    p.set_defaults(func=run)


def run(args) -> int:
    """Dispatch on the mode: a learned AMED sampler (--predictor) or the training-free solvers."""
    if getattr(args, "threads", 0):
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "predictor", None):
        return run_predictor(args)
    if getattr(args, "out", None):
        raise ValueError("--out saves a learned sampler's samples: use it with --predictor DIR")
    if getattr(args, "tracking_uri", None):
        raise ValueError("--tracking-uri names the registry of --predictor models:/NAME@ALIAS: use it with --predictor")
    if getattr(args, "teacher", None) is None:
        args.teacher = "digits-gmm"
    if getattr(args, "panel", False):
        return run_panel(args)
    return run_base_solvers(args)


def run_panel(args) -> int:
    """Every option set of every solver at every NFE (amed_core.families.free.option_sets), ranked; the best per NFE
    is the baseline a learned sampler must beat."""
    import math

    from amed_core import evaluate
    from amed_core.denoisers import load_teacher
    from amed_core.families.free import option_sets
    from amed_core.metrics import fd_to_samples, rmse

    denoiser = load_teacher(args.teacher)
    exact = _fd_scored(args, denoiser)
    solvers = _parse_list(args.solvers, "--solvers")
    nfes = _parse_list(args.nfe, "--nfe", int)
    for s in solvers:
        if s not in evaluate.BASE_SOLVERS:
            raise ValueError(f"--solvers: unknown solver {s!r}; choose from {','.join(evaluate.BASE_SOLVERS)}")
    noise = evaluate.seeded_noise(range(args.seed, args.seed + args.n), denoiser.shape)
    m = min(args.rmse_samples, args.n)
    ref = evaluate.reference_solution(denoiser, noise[:m], num_steps=args.reference_steps)
    target = evaluate.exact_samples(denoiser, args.n, args.seed) if exact else None
    key = "fd" if exact else "rmse"
    print(f"amed sample --panel: {args.teacher}, n={args.n}, seed={args.seed}; {_score_note(args.teacher, exact)}",
          flush=True)
    rows = []
    for nfe in nfes:
        here = []
        for s in solvers:
            for o in option_sets(s, nfe):
                run = evaluate.sample_solver(denoiser, s, nfe, args.n, args.seed, schedule=o["schedule"],
                                             options=o["options"], afs=o["afs"], noise=noise, batch_size=args.batch_size)
                fd = fd_to_samples(run.x, target) if exact else None
                here.append({"nfe": nfe, "solver": s, "schedule": o["schedule"].schedule_type,
                             "rho": o["schedule"].rho, "afs": o["afs"], "options": o["options"], "fd": fd,
                             "rmse": rmse(run.x[:m], ref), "num_steps": run.num_steps})
        here.sort(key=lambda r: (not math.isfinite(r[key]), r[key]))
        rows += here
        print(f"\nNFE {nfe}: {len(here)} entries, best first ({key}, lower is better)")
        print(f"  {'solver':<7} {'schedule':<13} {'afs':<5} {'options':<72} {'FD':>9} {'RMSE':>9}")
        for i, r in enumerate(here):
            opts = ",".join(f"{k}={v}" for k, v in sorted(r["options"].items()))
            sched = f"{r['schedule']}" + (f" {r['rho']:g}" if r["schedule"] != "logsnr" else "")
            print(f"{'*' if i == 0 else ' '} {r['solver']:<7} {sched:<13} {str(r['afs']):<5} {opts:<72} "
                  f"{evaluate.fmt_score(r['fd'])} {r['rmse']:>9.5f}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "panel.json", {"teacher": args.teacher, "n": args.n, "seed": args.seed, "metric": key,
                                         "rows": rows})
    print(f"\nwrote {out_dir / 'panel.json'}  (* = the best training-free sampler at that NFE)")
    return 0


def _fd_scored(args, denoiser) -> bool:
    """Whether FD can be scored (the teacher draws exact samples); --n checked against what is scored."""
    from amed_core.evaluate import has_exact_samples

    exact = has_exact_samples(denoiser)
    if args.n < (2 if exact else 1):
        raise ValueError(f"--n must be at least {2 if exact else 1}"
                         f"{' (FD needs a covariance)' if exact else ''}, got {args.n}")
    return exact


def _score_note(teacher: str, exact: bool) -> str:
    """The header line saying what the scores are."""
    if exact:
        return "scores: FD to exact samples, RMSE to the near-exact ODE solution"
    return (f"scores: RMSE to the near-exact ODE solution only; FD n/a ({teacher} cannot draw exact samples, "
            "only an analytic mixture such as digits-gmm can)")


def _checkpoint_teacher(args, spec):
    """(name, denoiser) for --predictor: --teacher when given (it must be the checkpoint's teacher: same content
    hash), else the built-in teacher (digits-gmm, digits-tiny-unet, ...) whose hash ``spec.teacher`` records."""
    from amed_core import adapters
    from amed_core.denoisers import BUILTIN_TEACHERS, load_teacher

    ident = dict(spec.teacher or {})
    want, name = ident.get("content_sha256"), ident.get("name")
    label = f"{name!r}" + (f" (sha256 {want[:12]}...)" if want else "")
    if args.teacher:
        denoiser = load_teacher(args.teacher)
        have = denoiser.identity().get("content_sha256") if hasattr(denoiser, "identity") else None
        if want and have and have != want:
            raise ValueError(f"--teacher {args.teacher!r} (sha256 {have[:12]}...) is not the teacher this checkpoint "
                             f"was trained for: {label}; omit --teacher to use the checkpoint's own teacher, or "
                             "pass that one")
        return args.teacher, denoiser
    builtins = sorted(BUILTIN_TEACHERS) + sorted(adapters.BUILTIN_NETWORKS)
    if not want:  # a spec without a teacher hash: its named built-in, else the historical default
        pick = name if name in builtins else "digits-gmm"
        log.warning("checkpoint records no teacher hash; using --teacher %s", pick)
        return pick, load_teacher(pick)
    # the named one first, then built-ins of the same family (mixture / network): usually one load
    mixture = ident.get("adapter") == "gmm"
    for cand in sorted(builtins, key=lambda b: (b != name, (b in BUILTIN_TEACHERS) != mixture)):
        denoiser = load_teacher(cand)
        if denoiser.identity().get("content_sha256") == want:
            return cand, denoiser
    raise ValueError(f"--teacher: this checkpoint was trained for {label}, which is none of the built-in teachers "
                     f"({', '.join(builtins)}); pass it as --teacher NAME (e.g. gmm:PATH.npz, tiny-unet:DIR)")


def _parse_list(text: str, name: str, cast=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{name} needs at least one value (comma-separated)")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated {cast.__name__} values, got {text!r}") from None


def _schedules(args, solvers, denoiser) -> dict:
    from amed_core.evaluate import default_schedule
    from amed_core.schedules import ScheduleSpec

    out = {}
    for s in solvers:
        if args.schedule == "auto":
            spec = default_schedule(s)
            if args.rho is not None and spec.schedule_type in ("polynomial", "time_uniform"):
                spec = dataclasses.replace(spec, rho=args.rho)
        else:
            rho = args.rho if args.rho is not None else (7.0 if args.schedule == "polynomial" else 1.0)
            spec = ScheduleSpec(args.schedule, rho=rho)
        out[s] = dataclasses.replace(spec, sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
    return out


def _write_json(path: Path, obj) -> None:
    from amed_core.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def _write_npz(path: Path, **arrays) -> None:
    import numpy as np

    from amed_core.io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name without it
            np.savez(f, **arrays)

    atomic_write(path, write)


def run_base_solvers(args) -> int:
    """The training-free solvers' table: amed_core.evaluate.quality_table, printed and saved."""
    import torch

    from amed_core import evaluate
    from amed_core.denoisers import load_teacher
    from amed_core.methods import get_method

    solvers = _parse_list(args.solvers, "--solvers")
    for s in solvers:
        if s not in evaluate.BASE_SOLVERS:
            raise ValueError(f"--solvers: unknown solver {s!r}; choose from {','.join(evaluate.BASE_SOLVERS)}")
    nfes = _parse_list(args.nfe, "--nfe", int)
    if any(v < 1 for v in nfes):
        raise ValueError(f"--nfe values must be positive, got {nfes}")
    denoiser = load_teacher(args.teacher)
    exact = _fd_scored(args, denoiser)
    afs = {"auto": None, "on": True, "off": False}[args.afs]
    for s in solvers:                       # fail before any work when an NFE is unreachable
        for v in nfes:
            try:
                evaluate.num_steps_for(s, v, evaluate.pick_afs(s, v, afs))
            except ValueError as e:
                raise ValueError(f"--nfe/--afs: {e}") from None
    options = {}
    if args.no_dynamic_thresholding:
        options = {s: {"dynamic_thresholding": False} for s in solvers if "dynamic_thresholding" in get_method(s).options}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    print(f"amed sample: {args.teacher}, solvers {','.join(solvers)}, NFE {','.join(map(str, nfes))}, "
          f"n={args.n}, seed={args.seed}\n{_score_note(args.teacher, exact)}", flush=True)
    total = len(solvers) * len(nfes)
    done = []

    def progress(row):
        done.append(row)
        print(f"  [{len(done)}/{total}] {row.solver} NFE {row.nfe}: FD {evaluate.fmt_score(row.fd, width=0)}, "
              f"RMSE {row.rmse:.5f} ({row.seconds:.1f} s)", flush=True)

    schedules = _schedules(args, solvers, denoiser)
    table = evaluate.quality_table(denoiser, solvers, nfes, args.n, args.seed, schedules=schedules,
                                   options=options, afs=afs, rmse_samples=args.rmse_samples,
                                   reference_steps=args.reference_steps, batch_size=args.batch_size, progress=progress)
    print()
    print(evaluate.format_table(table))

    record = {"teacher": args.teacher, "teacher_identity": denoiser.identity(), **table.to_dict()}
    _write_json(out_dir / "quality.json", record)
    evaluate.save_quality_plot(table, out_dir / "quality.png", title=f"{args.teacher}: quality vs NFE (n={args.n}"
                                                                     f"{'' if exact else '; RMSE only, no exact samples'})")
    # samples.png: the first samples of each solver at its largest NFE, then exact mixture samples (if any).
    k = max(1, min(args.grid_per_row, args.n))
    seeds = range(args.seed, args.seed + k)
    rows = []
    for s in solvers:
        run = evaluate.sample_solver(denoiser, s, max(nfes), k, args.seed, schedules[s], options.get(s),
                                     afs=afs, noise=evaluate.seeded_noise(seeds, denoiser.shape))
        rows.append(evaluate.to_images(denoiser, run.x))  # decoded for latent models
    if exact:
        rows.append(denoiser.sample(k, generator=torch.Generator().manual_seed(args.seed)))
    evaluate.save_grid_png(torch.cat(rows), out_dir / "samples.png", nrow=k)
    print(f"\nwrote {out_dir / 'quality.json'}, {out_dir / 'quality.png'}, {out_dir / 'samples.png'} "
          f"(rows: {', '.join(solvers)} at NFE {max(nfes)}{', then exact samples' if exact else ''})")
    return 0


def run_predictor(args) -> int:
    """A learned AMED sampler next to its base solver at the same NFE (amed_core.amed.evaluation)."""
    from amed_core import evaluate
    from amed_core.amed.evaluation import compare_with_base, policy_trace, save_policy_plot
    from flows.registry.loading import load_sampler  # a folder, an fsspec URL or models:/NAME@ALIAS

    sampler = load_sampler(args.predictor, tracking_uri=getattr(args, "tracking_uri", None))
    if not hasattr(sampler, "predictor"):  # free / gits / epd: no learned per-step policy to trace
        return run_family_sampler(args, sampler)
    spec = sampler.spec
    args.teacher, denoiser = _checkpoint_teacher(args, spec)
    exact = _fd_scored(args, denoiser)
    sampler.check_denoiser(denoiser)  # the loader's own guard (content hash), before any work
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"amed sample: {args.predictor} = {spec.solver} at NFE {spec.nfe} (N={spec.num_steps}, afs={spec.afs}, "
          f"{spec.schedule.schedule_type}) on {args.teacher}, n={args.n}, seed={args.seed}\n"
          f"{_score_note(args.teacher, exact)}", flush=True)
    rows, run = compare_with_base(sampler, denoiser, args.n, args.seed, rmse_samples=args.rmse_samples,
                                  batch_size=args.batch_size, reference_steps=args.reference_steps)
    print(f"\n{'sampler':<18} {'NFE':>4} {'FD':>9} {'RMSE':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r.name:<18} {r.nfe:>4} {evaluate.fmt_score(r.fd)} {r.rmse:>9.5f} {r.seconds:>8.2f}")
    trace = policy_trace(sampler, denoiser, evaluate.seeded_noise(range(args.seed, args.seed + min(args.n, 256)), denoiser.shape))
    for i, (r_m, r_s, c_m, a_m) in enumerate(zip(trace["r_mean"], trace["r_std"], trace["scale_dir_mean"], trace["scale_time_mean"])):
        print(f"  step {i}: t {trace['t_cur'][i]:.4g} -> {trace['t_next'][i]:.4g}, r {r_m:.3f} +- {r_s:.3f}, "
              f"scale_dir {c_m:.4f}, scale_time {a_m:.4f}")
    k = max(1, min(args.grid_per_row, args.n))
    evaluate.save_grid_png(evaluate.to_images(denoiser, run.x[: k * min(k, max(1, args.n // k))]),
                           out_dir / "predictor-samples.png", nrow=k)
    save_policy_plot(trace, out_dir / "policy.png", title=f"{spec.solver}, NFE {spec.nfe}: learned policy per step")
    _write_json(out_dir / "predictor-quality.json", {"predictor": str(args.predictor), "spec": spec.to_dict(),
                                                     "teacher": args.teacher, "n": args.n, "seed": args.seed,
                                                     "rows": [r.to_dict() for r in rows], "policy": trace})
    written = [out_dir / "predictor-quality.json", out_dir / "predictor-samples.png", out_dir / "policy.png"]
    if args.out:
        _write_npz(Path(args.out), samples=run.x.numpy())
        written.append(Path(args.out))
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def run_family_sampler(args, sampler) -> int:
    """A free / GITS / EPD checkpoint (amed_core.families): FD / RMSE of its samples, NFE and denoiser calls."""
    import torch

    from amed_core import evaluate
    from amed_core.denoisers import load_teacher
    from amed_core.families import describe
    from amed_core.metrics import fd_to_samples, rmse

    d = describe(sampler)
    args.teacher = args.teacher or sampler.spec.teacher.get("name") or "digits-gmm"
    denoiser = load_teacher(args.teacher)
    exact = _fd_scored(args, denoiser)
    noise = evaluate.seeded_noise(range(args.seed, args.seed + args.n), denoiser.shape)
    xs = [sampler(denoiser, noise[lo:lo + args.batch_size]).x for lo in range(0, args.n, args.batch_size)]
    x = torch.cat(xs).to(torch.float64)
    m = min(args.rmse_samples, args.n)
    ref = evaluate.reference_solution(denoiser, noise[:m], num_steps=args.reference_steps)
    fd = fd_to_samples(x, evaluate.exact_samples(denoiser, args.n, args.seed)) if exact else None
    print(f"amed sample: {args.predictor} = {d['family']} {d['method']} at NFE {d['nfe']} ({d['denoiser_calls']} denoiser "
          f"calls per sample, {d['num_steps']} time points) on {args.teacher}, n={args.n}\n{_score_note(args.teacher, exact)}")
    print(f"FD {evaluate.fmt_score(fd)}  RMSE {rmse(x[:m], ref):.5f}")
    if args.out:
        _write_npz(Path(args.out), samples=x.numpy())
        print(f"wrote {args.out}")
    return 0
