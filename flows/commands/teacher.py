"""`amed teacher generate | ls | verify | repair | train-tiny | train-photos`: shared teacher trajectories in a store
(flows.storage), and the tiny UNet teachers on digits and on 32x32 photo crops (``amed_core.tiny_train.train_tiny``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _storage_options(text: str | None) -> dict | None:
    if not text:
        return None
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options must be a JSON object or @FILE.json: {e}") from None
    if not isinstance(opts, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    return opts


def _store(args):
    from flows.storage import TeacherStore

    return TeacherStore(args.store, storage_options=_storage_options(args.storage_options))


def _guard(fn):
    """Store errors as one clear line: credentials -> exit 3, verification -> exit 1."""

    def guarded(args):
        from flows.storage import ShardVerificationError, StoreCredentialsError

        try:
            return fn(args)
        except StoreCredentialsError as e:
            print(f"amed teacher: error: {e}", file=sys.stderr)
            return 3
        except ShardVerificationError as e:
            print(f"amed teacher: verification failed: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - a store that fails mid-way (disk full, server gone): one line
            if not _store_failure(e):
                raise
            text = " ".join(str(e).split())[:300] or type(e).__name__
            print(f"amed teacher: error: the store failed ({type(e).__name__}: {text}); committed shards are kept and "
                  "nothing partial counts: fix the store (free space, restart the server) and rerun (generate resumes)",
                  file=sys.stderr)
            return 4

    return guarded


def _store_failure(e: BaseException) -> bool:
    """An I/O failure of the store (OSError such as ENOSPC, a refused or dropped connection), not a bug."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) or any(w in type(e).__name__ for w in ("Connect", "Endpoint", "Timeout")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _check_generate_args(args) -> None:
    """The sweep schema's bounds (flows.config TeacherConfig) for the same settings given as flags."""
    from flows.config import MAX_SEED

    bounds = {"--n": (args.n, 1, MAX_SEED), "--shard-size": (args.shard_size, 1, MAX_SEED),
              "--sub-steps": (args.sub_steps, 1, 16), "--seed": (args.seed, 0, MAX_SEED - args.n)}
    if args.batch_size is not None:
        bounds["--batch-size"] = (args.batch_size, 1, MAX_SEED)
    for flag, (v, lo, hi) in bounds.items():
        if not lo <= v <= hi:
            raise ValueError(f"{flag} must be an integer in {lo}..{hi} (got {v})")


def _report_repair(rep) -> None:
    for i, why in sorted(rep.bad.items()):
        print(f"  shard {i}: {why}")
    for where, why in sorted(rep.invalid.items()):
        print(f"  {where}: {why}")
    print(f"{rep.spec_hash[:16]} repaired: {len(rep.removed)} file(s) removed, {rep.kept}/{rep.num_shards} shards kept"
          + (f" ({', '.join(rep.removed[:8])}{', ...' if len(rep.removed) > 8 else ''})" if rep.removed else ""))


def generate(args) -> int:
    from amed_core.denoisers import load_teacher

    _check_generate_args(args)
    from amed_core.schedules import ScheduleSpec
    from amed_core.teacher import TeacherSpec, student_grids_for
    from flows.storage import generate

    denoiser = load_teacher(args.teacher)
    schedule = ScheduleSpec(schedule_type=args.schedule, rho=args.rho,
                            sigma_min=args.sigma_min if args.sigma_min is not None else denoiser.sigma_min,
                            sigma_max=args.sigma_max if args.sigma_max is not None else denoiser.sigma_max)
    afs = {"auto": None, "on": True, "off": False}[args.afs]
    grids = student_grids_for(args.grid_for, schedule, afs=afs)
    spec = TeacherSpec.for_denoiser(
        denoiser, grids, num_trajectories=args.n, shard_size=args.shard_size, sub_steps=args.sub_steps,
        solver=args.solver, dtype=args.dtype, compute_dtype=args.compute_dtype, base_seed=args.seed,
        refine_space="logsnr" if args.schedule == "logsnr" else "polynomial", refine_rho=args.rho)
    store = _store(args)
    if args.verify and spec.spec_hash in store.list_specs():  # regenerate whatever fails verification
        _report_repair(store.repair(spec.spec_hash))
    union = spec.union_grid()
    print(f"teacher {spec.spec_hash} in {store.url}: {args.teacher}, students N={[g.num_steps for g in grids]}, "
          f"union grid {len(union)} points, teacher grid {len(spec.teacher_grid())} points ({spec.solver}, M={spec.sub_steps})",
          flush=True)
    summary = generate(store, denoiser, spec, progress=not args.no_progress, batch_size=args.batch_size)
    print(f"trajectories: {summary.trajectories} / {spec.num_trajectories}")
    print(f"shards: {summary.shards} / {spec.num_shards} ({summary.shards_written} written now, {summary.shards_skipped} already done)")
    print(f"bytes: {summary.bytes} ({_human(summary.bytes)})")
    print(f"NFE spent now: {summary.nfe_spent} ({summary.nfe_per_trajectory} per trajectory)")
    print(f"spec hash: {summary.spec_hash}")
    if args.verify:
        report = store.verify(spec.spec_hash)
        print(f"verify: {'OK' if report.passed else 'FAILED'} ({len(report.ok)}/{report.num_shards} shards)")
        if not report.passed:
            return 1
    return 0 if summary.shards == spec.num_shards else 1


def repair(args) -> int:
    store = _store(args)
    hashes = [store.resolve(args.spec_hash)] if args.spec_hash else store.list_specs()
    if not hashes:
        print(f"no teachers in {store.url}", file=sys.stderr)
        return 1
    for h in hashes:
        _report_repair(store.repair(h))
    print("run `amed teacher generate` with the teacher's arguments (or the sweep again) to regenerate removed shards")
    return 0


def ls(args) -> int:
    store = _store(args)
    hashes = store.list_specs()  # a missing bucket raises
    if store._local and not os.path.isdir(store.root or "/"):
        raise ValueError(f"store {store.url} does not exist (no such folder); check --store")
    if not hashes:
        print(f"no teachers in {store.url}")
        return 0
    print(f"{'spec hash':16}  {'shards':>9}  {'trajectories':>12}  {'bytes':>10}  model / students / teacher")
    for h in hashes:
        spec = store.get_spec(h)
        entries = store.manifest(h)  # commit records only: stray files and out-of-range indexes never count
        n = sum(e["num_samples"] for e in entries.values())
        b = sum(e["bytes"] for e in entries.values())
        model = spec.model.get("name", spec.model.get("adapter"))
        students = ",".join(str(g.num_steps) for g in spec.grids)
        print(f"{h[:16]}  {len(entries):>4}/{spec.num_shards:<4}  {n:>12}  {_human(b):>10}  {model} / N={students} / "
              f"{spec.solver} M={spec.sub_steps} {spec.dtype}")
    return 0


def verify(args) -> int:
    store = _store(args)
    hashes = [store.resolve(args.spec_hash)] if args.spec_hash else store.list_specs()
    if not hashes:
        print(f"no teachers in {store.url}", file=sys.stderr)
        return 1
    failed = False
    for h in hashes:
        report = store.verify(h)
        status = "OK" if report.passed else "FAILED"
        print(f"{h[:16]} {status}: {len(report.ok)}/{report.num_shards} shards verified ({_human(report.bytes)})")
        if report.missing:
            print(f"  missing shards: {report.missing}")
        for i, why in report.bad.items():
            print(f"  shard {i}: {why}")
        for where, why in sorted(report.invalid.items()):
            print(f"  {where}: {why} (`amed teacher repair` removes it)")
        failed |= not report.passed
    return 1 if failed else 0


def train_tiny(args) -> int:
    import torch

    from amed_core.tiny_train import TinyUNetConfig, TrainTinyConfig, train_tiny

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    unet = TinyUNetConfig(img_resolution=args.resolution, model_channels=args.channels, channel_mult=(1, 2),
                          label_dim=10 if args.conditional else 0)
    cfg = TrainTinyConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          conditional=args.conditional, unet=unet)
    den = train_tiny(config=cfg, out=args.out, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "teacher": f"tiny-unet:{args.out}", **den.identity()}, indent=2))
    return 0


# The shipped photos-tiny-unet's settings (amed_core/data/tiny_unet_photos/config.json records them): 600 steps took
# 29 min on the shared 2-core dev box at load average 25-30 (BENCHMARKS "Neural teachers"); more steps (--steps 3000,
# --ema-halflife 200) give a teacher closer to its data.
PHOTOS_STEPS, PHOTOS_BATCH, PHOTOS_EMA, PHOTOS_CHANNELS = 600, 32, 50.0, 16


def train_photos(args) -> int:
    import torch

    from amed_core.tiny_train import TrainTinyConfig, photos_unet_config, train_tiny

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = TrainTinyConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, dataset="photos",
                          ema_halflife_steps=args.ema_halflife, unet=photos_unet_config(args.channels))
    den = train_tiny(config=cfg, out=args.out, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "teacher": f"tiny-unet:{args.out}", **den.identity()}, indent=2))
    return 0


HANDLERS = {"generate": _guard(generate), "ls": _guard(ls), "verify": _guard(verify), "repair": _guard(repair),
            "train-tiny": train_tiny, "train-photos": train_photos}


def run(args) -> int:
    """Dispatch ``amed teacher SUBCOMMAND``."""
    return HANDLERS[args.teacher_command](args)


def register(subparsers) -> None:
    p = subparsers.add_parser("teacher", help="generate, list and verify stored teacher trajectories; train the tiny UNet teacher")
    teacher_subparsers = p.add_subparsers(dest="teacher_command", metavar="TEACHER_COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])  # no sub-command: help

    def store_args(q):
        q.add_argument("--store", required=True, help="store path or fsspec URL (file://, s3://bucket/prefix, memory://)")
        q.add_argument("--storage-options", default=None,
                       help="JSON object (or @FILE.json) of fsspec options, e.g. endpoint_url/region/profile; "
                            "S3 also reads AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION and AWS_* keys")

    g = teacher_subparsers.add_parser("generate", help="generate (or resume) a sharded teacher for a sweep's student grids")
    g.add_argument("--teacher", required=True, help="digits-gmm or gmm:PATH.npz")
    g.add_argument("--grid-for", required=True, help='student grids as "SOLVER:NFE,NFE;SOLVER:NFE", e.g. "amed:3,5,7;amed+ipndm:3,5,7"')
    g.add_argument("--n", type=int, required=True, help="number of trajectories")
    g.add_argument("--shard-size", type=int, default=250, help="trajectories per shard (default 250)")
    g.add_argument("--sub-steps", type=int, default=1, help="M points inserted into every union-grid interval (default 1)")
    g.add_argument("--solver", default="heun", help="teacher ODE solver (default heun)")
    g.add_argument("--dtype", default="float32", help="storage dtype: float16, bfloat16, float32, float64 (default float32)")
    g.add_argument("--compute-dtype", default="float64", help="teacher arithmetic: float32 or float64 (default float64)")
    g.add_argument("--seed", type=int, default=0, help="base seed: trajectory j uses seed + j (default 0)")
    g.add_argument("--schedule", default="polynomial", help="student schedule family (default polynomial)")
    g.add_argument("--rho", type=float, default=7.0, help="schedule rho (default 7)")
    g.add_argument("--sigma-min", type=float, default=None, help="default: the model's")
    g.add_argument("--sigma-max", type=float, default=None, help="default: the model's")
    g.add_argument("--afs", choices=("auto", "on", "off"), default="auto",
                   help="students' analytical first step: auto = on for AMED solvers at odd NFE")
    g.add_argument("--batch-size", type=int, default=None, help="teacher batch (default: one shard); content does not depend on it")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verify", action="store_true",
                   help="verify every stored shard first (SHA-256), remove what fails and regenerate it; verify again at the end")
    store_args(g)
    g.set_defaults(func=run)

    ls = teacher_subparsers.add_parser("ls", help="list the teachers in a store")
    store_args(ls)
    ls.set_defaults(func=run)

    v = teacher_subparsers.add_parser("verify", help="check every shard's size, SHA-256 and XXH3-128 (exit 1 on any problem)")
    v.add_argument("spec_hash", nargs="?", default=None, help="spec hash or unique prefix (default: every teacher)")
    store_args(v)
    v.set_defaults(func=run)

    r = teacher_subparsers.add_parser(
        "repair", help="remove shards that fail verification, stray or invalid manifest records and special files, so "
                       "`generate` regenerates them")
    r.add_argument("spec_hash", nargs="?", default=None, help="spec hash or unique prefix (default: every teacher)")
    store_args(r)
    r.set_defaults(func=run)

    t = teacher_subparsers.add_parser(
        "train-tiny", help="train the tiny EDM-preconditioned UNet on scikit-learn's digits (minutes on CPU)",
        description="Writes config.json + model.safetensors to --out; use it as teacher 'tiny-unet:DIR'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--resolution", type=int, choices=[8, 16], default=8, help="8 = the digits' own size; 16 upsamples")
    t.add_argument("--channels", type=int, default=16, help="channels of the first level")
    t.add_argument("--conditional", action="store_true", help="class-conditional on the digit (label_dim 10)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run)

    ph = teacher_subparsers.add_parser(
        "train-photos", help="train the 32x32 RGB UNet on crops of the photographs shipped in scikit-image's and "
                             "scikit-learn's wheels (the photos-tiny-unet teacher)",
        description="Writes config.json + model.safetensors to --out; use it as teacher 'tiny-unet:DIR'. Needs "
                    "scikit-image installed (its wheel holds the photographs; nothing is downloaded).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ph.add_argument("--out", required=True, help="output folder")
    ph.add_argument("--steps", type=int, default=PHOTOS_STEPS)
    ph.add_argument("--batch-size", type=int, default=PHOTOS_BATCH)
    ph.add_argument("--lr", type=float, default=2e-3)
    ph.add_argument("--ema-halflife", type=float, default=PHOTOS_EMA, help="EMA half-life in optimiser steps")
    ph.add_argument("--channels", type=int, default=PHOTOS_CHANNELS, help="channels of the 32x32 level")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ph.add_argument("--no-progress", action="store_true")
    ph.set_defaults(func=run)


__all__ = ["register", "run"]
