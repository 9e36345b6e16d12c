"""Teacher store benchmark: I/O throughput against plain fsspec, and the teacher NFE a sweep spends.

    .venv/bin/python bench/store.py throughput            # local disk and S3 (moto on 127.0.0.1)
    .venv/bin/python bench/store.py nfe                   # exact counts, instant
    .venv/bin/python bench/store.py fd --recipe improved --trajectories 10000 --seeds 3 --shared-M 3
    .venv/bin/python bench/store.py teachers --samples 2048   # each teacher's own FD at sigma_min
    .venv/bin/python bench/store.py all --json out.json

throughput: shard write = ``TeacherStore.commit_many`` (per shard: serialise, SHA-256 + XXH3-128, write-once put,
manifest entry - the entry of shard i is written while shard i+1 uploads) plus the final manifest.json; read =
``read_shard`` (get or map, size + XXH3-128 check, parse). The baseline is a plain fsspec ``pipe_file`` /
``cat_file`` of the very same bytes to the same filesystem. Ratio = store throughput / plain throughput (1.0 = no
overhead). Median of repeats. Local disks are timed twice each way: writes into the page cache and writes with
every file fsync'ed (what the disk sustains once a large teacher has filled the page cache); reads warm (both sets
in the page cache) and cold (each file written back and dropped from the page cache with
posix_fadvise(DONTNEED) first, so it comes from the disk).

nfe: teacher denoiser evaluations of the sweep {amed, amed+ipndm, amed+dpmpp} x NFE {3,5,7,9} x 3 seeds at
T trajectories per training. Per-run regeneration = the reference recipe (heun, M=1 for amed; the student's
base solver with M=2 for plugins, on grid((M+1)(N-1)+1)), paid by every run; shared = one teacher on the
union of the sweep's grids (heun, M sub-steps per union interval), paid once. Counts come from running the
solvers with a counting denoiser (exact, machine-independent).

fd: trains predictors for the sweep with each teacher (regen = train_amed's on-the-fly teacher set to the
reference's per-run teacher, the one ``nfe`` charges; shared = the stored union teacher of the whole sweep streamed
by ``TeacherStore.iter_batches``), both with one recipe (``--recipe reference``: TrainConfig(); ``improved``:
TrainConfig.improved and the quickstart's plugin options), and reports the Frechet distance of their samples to
the exact mixture's moments (``fd_exact_gmm``, digits-gmm), per seed and mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amed_core.schedules import ScheduleSpec  # noqa: E402
from amed_core.shards import TeacherShard  # noqa: E402
from amed_core.teacher import TeacherSpec, student_grids_for, teacher_nfe_per_trajectory  # noqa: E402

SOLVERS = ("amed", "amed+ipndm", "amed+dpmpp")
NFES = (3, 5, 7, 9)
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# Throughput.

def _synthetic(shape, times, per_shard, k, dtype):
    """k random shards of a spec with the given image shape and union-grid length (content is irrelevant to I/O)."""
    spec = TeacherSpec(model={"adapter": "synthetic", "content_sha256": "0" * 64}, shape=shape,
                       grids=student_grids_for("amed:3,5,7,9"), num_trajectories=k * per_shard, shard_size=per_shard,
                       dtype=dtype)
    G = len(spec.union_grid())
    if G != times:
        raise ValueError(f"union grid has {G} points, wanted {times}")
    g = torch.Generator().manual_seed(0)
    sdt = {"float16": torch.float16, "float32": torch.float32}[dtype]
    shards = []
    for i in range(k):
        noise = torch.randn(per_shard, *shape, generator=g)
        states = torch.randn(G, per_shard, *shape, generator=g)
        shards.append(TeacherShard(spec_hash=spec.spec_hash, index=i, seeds=spec.seeds(i), noise=noise.to(sdt),
                                   states=states.to(sdt), sigmas=spec.union_grid(), nfe=0))
    return spec, shards


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _fsync(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _evict(paths) -> None:
    """Drop local files from the page cache (written back first), so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def throughput(url: str, shape=(1, 8, 8), per_shard=250, k=8, dtype="float32", repeats=3) -> dict:
    from flows.storage import TeacherStore

    spec, shards = _synthetic(shape, 11, per_shard, k, dtype)  # the sweep's union grid
    nbytes = sum(len(s.to_bytes()) for s in shards)
    local = "://" not in url
    rows = {"store_write": [], "plain_write": [], "store_read": [], "plain_read": []}
    if local:
        rows.update({"store_read_cold": [], "plain_read_cold": [], "store_write_synced": [], "plain_write_synced": []})
    for r in range(repeats):
        store = TeacherStore(f"{url}/run-{r}-{uuid.uuid4().hex[:6]}")
        fs = store.fs
        plain = f"{store.root}/plain"
        blobs = [s.to_bytes() for s in shards]
        fs.makedirs(plain, exist_ok=True)
        store.put_spec(spec)
        plain_paths = [f"{plain}/shard-{i:05d}.safetensors" for i in range(k)]
        store_paths = [store.shard_path(spec.spec_hash, i) for i in range(k)]

        def store_write():
            store.commit_many(spec, shards)  # objects, entries (pipelined), then manifest.json

        def plain_write():
            for path, b in zip(plain_paths, blobs):
                fs.pipe_file(path, b)

        entries = None

        def store_read():
            for i in range(k):
                store.read_shard(spec.spec_hash, i, entries[i])

        def plain_read():
            for path in plain_paths:
                fs.cat_file(path)

        def timed(fn) -> float:
            if local:
                os.sync()  # each timing starts with no dirty pages: no arm pays for the other's writeback
            return _time(fn)

        def both(key, plain_fn, store_fn, before=None):  # alternate which arm goes first
            for arm in (("plain", "store") if r % 2 == 0 else ("store", "plain")):
                if before is not None:
                    before(arm)
                rows[f"{arm}_{key}"].append(timed(plain_fn if arm == "plain" else store_fn))

        def fresh():  # remove what the write timings wrote, so they can run again
            for path in plain_paths:
                if fs.exists(path):
                    fs.rm_file(path)
            if fs.exists(store.spec_dir(spec.spec_hash)):
                fs.rm(store.spec_dir(spec.spec_hash), recursive=True)
            store.put_spec(spec)

        both("write", plain_write, store_write)
        if local:  # the same writes again, each file fsync'ed: what a disk sustains once the page cache is full
            fresh()
            both("write_synced", lambda: (plain_write(), _fsync(plain_paths)), lambda: (store_write(), _fsync(store_paths)))
        entries = store.manifest(spec.spec_hash)
        plain_read(), store_read()  # warm: both sets in the page cache
        both("read", plain_read, store_read)
        if local:
            both("read_cold", plain_read, store_read,
                 before=lambda arm: _evict(plain_paths if arm == "plain" else store_paths))
    med = {k_: statistics.median(v) for k_, v in rows.items()}
    mb = nbytes / 2**20
    out = {
        "url": url.split("/run-")[0], "shard_shape": list(shape), "trajectories_per_shard": per_shard, "shards": k,
        "dtype": dtype, "shard_MiB": round(mb / k, 3), "total_MiB": round(mb, 2), "repeats": repeats,
        "seconds": {k_: [round(x, 5) for x in v] for k_, v in rows.items()},
        "write_MiB_s": {"store": round(mb / med["store_write"], 1), "plain": round(mb / med["plain_write"], 1)},
        "read_MiB_s": {"store": round(mb / med["store_read"], 1), "plain": round(mb / med["plain_read"], 1)},
        "write_ratio": round(med["plain_write"] / med["store_write"], 3),
        "read_ratio": round(med["plain_read"] / med["store_read"], 3),
    }
    if local:
        out["synced_write_MiB_s"] = {"store": round(mb / med["store_write_synced"], 1),
                                     "plain": round(mb / med["plain_write_synced"], 1)}
        out["synced_write_ratio"] = round(med["plain_write_synced"] / med["store_write_synced"], 3)
        out["cold_read_MiB_s"] = {"store": round(mb / med["store_read_cold"], 1), "plain": round(mb / med["plain_read_cold"], 1)}
        out["cold_read_ratio"] = round(med["plain_read_cold"] / med["store_read_cold"], 3)
    return out


def _moto_process():
    """moto's S3 server in its own process on 127.0.0.1 (so it does not share our GIL, like a real server)."""
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
    return proc, endpoint


def run_throughput(repeats: int) -> list[dict]:
    import s3fs

    proc, endpoint = _moto_process()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"})
    s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for shape, dtype, k in (((1, 8, 8), "float32", 64), ((3, 32, 32), "float16", 16)):
                for url in (tmp, "s3://bench/store"):
                    row = throughput(url, shape=shape, dtype=dtype, k=k, repeats=repeats)
                    row["backend"] = "local" if url == tmp else "s3 (moto server process, loopback)"
                    print(json.dumps(row), flush=True)
                    out.append(row)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


# ---------------------------------------------------------------------------------------------
# Teacher NFE of a sweep.

def sweep_nfe(trajectories: int, shared_M: int = 1, seeds=SEEDS, schedule: ScheduleSpec | None = None) -> dict:
    from amed_core.amed import SamplerSpec, TrainConfig
    from amed_core.amed.train import default_teacher

    schedule = schedule or ScheduleSpec()
    cfg = TrainConfig()
    per_run = []
    for solver in SOLVERS:
        for nfe in NFES:
            spec = SamplerSpec.create(solver, nfe, afs=nfe % 2 == 1, schedule=schedule)
            name, M, opts = default_teacher(spec, cfg)
            N = spec.num_steps
            fine = schedule.grid((M + 1) * (N - 1) + 1)
            per_traj = teacher_nfe_per_trajectory(name, fine, **opts)
            per_run.append({"solver": solver, "nfe": nfe, "N": N, "teacher": name, "M": M, "nfe_per_trajectory": per_traj})
    regen_total = sum(r["nfe_per_trajectory"] for r in per_run) * len(seeds) * trajectories
    grid_for = ";".join(f"{s}:{','.join(map(str, NFES))}" for s in SOLVERS)
    shared = TeacherSpec(model={"adapter": "any", "content_sha256": "0" * 64}, shape=(1, 8, 8),
                         grids=student_grids_for(grid_for, schedule), num_trajectories=trajectories, sub_steps=shared_M)
    shared_per_traj = teacher_nfe_per_trajectory(shared.solver, shared.teacher_grid())
    shared_total = shared_per_traj * trajectories
    return {
        "trajectories_per_training": trajectories, "runs": len(per_run) * len(seeds), "per_run": per_run,
        "regen_total_nfe": regen_total,
        "shared": {"student_N": [g.num_steps for g in shared.grids], "union_points": len(shared.union_grid()),
                   "teacher_points": len(shared.teacher_grid()), "solver": shared.solver, "M": shared_M,
                   "nfe_per_trajectory": shared_per_traj},
        "shared_total_nfe": shared_total, "ratio": shared_total / regen_total,
    }


# ---------------------------------------------------------------------------------------------
# FD of predictors trained with each teacher.

def _student_and_config(solver: str, nfe: int, recipe: str, trajectories: int, seed: int, epochs: int, teacher,
                        thresholding: bool | None = None):
    """(SamplerSpec, TrainConfig for the shared arm, TrainConfig for the per-run arm) of one sweep cell.

    Both arms train with the same recipe; the per-run arm's on-the-fly teacher is always the reference's per-run
    teacher (heun M=1 for amed, the base solver M=2 for plugins): the one whose NFE ``sweep_nfe`` charges."""
    from amed_core.amed import PredictorConfig, SamplerSpec, TrainConfig

    reference_teacher = dict(teacher_solver="heun" if solver == "amed" else None, teacher_M=1 if solver == "amed" else 2)
    dt = {"dynamic_thresholding": thresholding} if solver == "amed+dpmpp" and thresholding is not None else {}
    if recipe == "reference":
        spec = SamplerSpec.create(solver, nfe, afs=nfe % 2 == 1, denoiser=teacher, **dt)
        cfg = TrainConfig(num_trajectories=trajectories, seed=seed, epochs=epochs)
        return spec, cfg, cfg  # TrainConfig()'s on-the-fly teacher is the reference's
    # ours (TrainConfig.improved, the quickstart's plugin options)
    plugin = solver in ("amed+ipndm", "amed+dpmpp")
    spec = SamplerSpec.create(solver, nfe, afs=nfe % 2 == 1, denoiser=teacher,
                              predictor=PredictorConfig(scale_time=0.2 if solver == "amed+ipndm" else 0.0),
                              afs_in_history=False if plugin else None, **dt)
    cfg = TrainConfig.improved(solver, num_trajectories=trajectories, seed=seed, epochs=epochs)
    regen = TrainConfig.improved(solver, num_trajectories=trajectories, seed=seed, epochs=epochs,
                                 teacher_solver=reference_teacher["teacher_solver"] or spec.base_solver,
                                 teacher_M=reference_teacher["teacher_M"])
    return spec, cfg, regen


def run_fd(trajectories: int, samples: int, seeds, shared_M: int, nfes=NFES, solvers=SOLVERS, recipe: str = "reference",
           epochs: int = 1, thresholding: bool | None = None) -> dict:
    from amed_core.amed import train_amed
    from amed_core.amed.train import default_teacher
    from amed_core.adapters import load_teacher
    from amed_core.amed.checkpoint import Sampler
    from amed_core.metrics import fd_exact_gmm
    from flows.storage import TeacherStore, generate

    teacher = load_teacher("digits-gmm")
    noise = torch.randn(samples, *teacher.shape, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    # the whole sweep's union grid, whichever cells this run trains (the teacher the NFE count charges)
    grid_for = ";".join(f"{s}:{','.join(map(str, NFES))}" for s in SOLVERS)
    spec = TeacherSpec.for_denoiser(teacher, student_grids_for(grid_for), num_trajectories=trajectories,
                                    shard_size=min(250, trajectories), sub_steps=shared_M, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        store = TeacherStore(tmp)
        t = time.perf_counter()
        summary = generate(store, teacher, spec, progress=False)
        gen_s = time.perf_counter() - t
        rows = []
        for solver in solvers:
            for nfe in nfes:
                res = {"solver": solver, "nfe": nfe, "recipe": recipe, "fd_regen": [], "fd_shared": []}
                if solver == "amed+dpmpp":
                    res["dynamic_thresholding"] = thresholding is not False
                for seed in seeds:
                    sampler, cfg, regen_cfg = _student_and_config(solver, nfe, recipe, trajectories, seed, epochs, teacher,
                                                                  thresholding)
                    name, M, _ = default_teacher(sampler, regen_cfg)
                    res["regen_teacher"] = f"{name} M={M}"
                    for kind in ("regen", "shared"):
                        if kind == "regen":
                            out = train_amed(teacher, sampler, regen_cfg)
                        else:
                            batches = store.iter_batches(spec.spec_hash, sampler.grid(), cfg.batch_size, seed=seed,
                                                         dtype=torch.float64, epochs=epochs)
                            out = train_amed(teacher, sampler, cfg, batches=batches)
                        x = Sampler(sampler, out.predictor)(teacher, noise).x
                        res[f"fd_{kind}"].append(round(fd_exact_gmm(x, teacher), 4))
                res["fd_regen_mean"] = statistics.mean(res["fd_regen"])
                res["fd_shared_mean"] = statistics.mean(res["fd_shared"])
                print(json.dumps(res), flush=True)
                rows.append(res)
    return {"trajectories": trajectories, "samples": samples, "seeds": list(seeds), "shared_M": shared_M,
            "recipe": recipe, "epochs": epochs, "shared_spec": spec.spec_hash, "shared_generate_seconds": round(gen_s, 1),
            "shared_nfe_per_trajectory": summary.nfe_per_trajectory, "rows": rows}


def teacher_accuracy(samples: int, shared_M: int = 1, nfes=NFES, solvers=SOLVERS) -> dict:
    """FD (to the exact mixture moments) of each teacher's own final states at sigma_min: how accurate it is."""
    from amed_core.amed import SamplerSpec, TrainConfig
    from amed_core.amed.train import default_teacher
    from amed_core.adapters import load_teacher
    from amed_core.metrics import fd_exact_gmm
    from amed_core.methods import solve

    teacher = load_teacher("digits-gmm")
    noise = torch.randn(samples, *teacher.shape, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    out = {"regen": []}
    for solver in solvers:
        for nfe in nfes:
            sampler = SamplerSpec.create(solver, nfe, afs=nfe % 2 == 1, denoiser=teacher)
            name, M, opts = default_teacher(sampler, TrainConfig())
            fine = sampler.schedule.grid((M + 1) * (sampler.num_steps - 1) + 1)
            with torch.no_grad():
                res = solve(name, teacher, noise * fine[0], fine, **opts)
            out["regen"].append({"solver": solver, "nfe": nfe, "teacher": f"{name} M={M}", "nfe_per_trajectory": res.nfe,
                                 "fd": round(fd_exact_gmm(res.x, teacher), 4)})
    grid_for = ";".join(f"{s}:{','.join(map(str, nfes))}" for s in solvers)
    spec = TeacherSpec.for_denoiser(teacher, student_grids_for(grid_for), num_trajectories=1, sub_steps=shared_M)
    with torch.no_grad():
        res = solve(spec.solver, teacher, noise * spec.teacher_grid()[0], spec.teacher_grid())
    out["shared"] = {"teacher": f"{spec.solver} M={shared_M} on the union grid", "nfe_per_trajectory": res.nfe,
                     "fd": round(fd_exact_gmm(res.x, teacher), 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("throughput", "nfe", "fd", "teachers", "all"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trajectories", type=int, default=10_000, help="per training (nfe); fd default 1024")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--shared-M", type=int, default=1)
    p.add_argument("--recipe", choices=("reference", "improved"), default="reference",
                   help="fd: training recipe of both arms (TrainConfig() or TrainConfig.improved)")
    p.add_argument("--epochs", type=int, default=1, help="fd: passes over each arm's trajectories")
    p.add_argument("--solvers", default=",".join(SOLVERS), help="fd: comma-separated students")
    p.add_argument("--nfes", default=",".join(map(str, NFES)), help="fd: comma-separated NFEs")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cores))")
    p.add_argument("--no-dynamic-thresholding", action="store_true",
                   help="fd: amed+dpmpp students (and their per-run dpmpp teacher) without dynamic thresholding")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    results = {}
    if args.what in ("throughput", "all"):
        results["throughput"] = run_throughput(args.repeats)
    if args.what in ("nfe", "all"):
        results["nfe"] = sweep_nfe(args.trajectories, args.shared_M)
        r = results["nfe"]
        print(json.dumps({k: v for k, v in r.items() if k != "per_run"}))
    if args.what in ("teachers", "all"):
        results["teachers"] = teacher_accuracy(args.samples, args.shared_M)
        print(json.dumps(results["teachers"]))
    if args.what in ("fd", "all"):
        t = args.trajectories if args.what == "fd" else 1024
        results["fd"] = run_fd(t, args.samples, list(range(args.seeds)), args.shared_M,
                               nfes=tuple(int(v) for v in args.nfes.split(",")), solvers=tuple(args.solvers.split(",")),
                               recipe=args.recipe, epochs=args.epochs,
                               thresholding=False if args.no_dynamic_thresholding else None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
