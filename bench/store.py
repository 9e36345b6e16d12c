"""Teacher store benchmark: I/O throughput against plain fsspec, and the teacher NFE a sweep spends.

    .venv/bin/python bench/store.py throughput            # local disk and S3 (moto on 127.0.0.1)
    .venv/bin/python bench/store.py nfe                   # exact counts, instant
    .venv/bin/python bench/store.py fd --trajectories 1024 --samples 2048 --seeds 3
    .venv/bin/python bench/store.py teachers --samples 2048   # each teacher's own FD at sigma_min
    .venv/bin/python bench/store.py all --json out.json

throughput: shard write = ``TeacherStore.commit_many`` (per shard: serialise, sha256, write-once put, manifest
entry - the entry of shard i is written while shard i+1 uploads) plus the final manifest.json; read = ``read_shard`` (get, size + sha256 check, parse). The baseline is a plain
fsspec ``pipe_file`` / ``cat_file`` of the very same bytes to the same filesystem. Ratio = store throughput /
plain throughput (1.0 = no overhead). Median of repeats, alternating store and plain.

nfe: teacher denoiser evaluations of the sweep {amed, amed+ipndm, amed+dpmpp} x NFE {3,5,7,9} x 3 seeds at
T trajectories per training. Per-run regeneration = the reference recipe (heun, M=1 for amed; the student's
base solver with M=2 for plugins, on grid((M+1)(N-1)+1)), paid by every run; shared = one teacher on the
union of the sweep's grids (heun, M sub-steps per union interval), paid once. Counts come from running the
solvers with a counting denoiser (exact, machine-independent).

fd: trains predictors for the sweep with each teacher (regen = train_amed's own on-the-fly reference teacher;
shared = the stored union teacher streamed by ``TeacherStore.iter_batches``) and reports the Frechet distance
of their samples to the exact mixture's moments (``fd_exact_gmm``, digits-gmm), per seed and mean.
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


def throughput(url: str, shape=(1, 8, 8), per_shard=250, k=8, dtype="float32", repeats=3) -> dict:
    from flows.store import TeacherStore

    spec, shards = _synthetic(shape, 11, per_shard, k, dtype)  # the sweep's union grid
    nbytes = sum(len(s.to_bytes()) for s in shards)
    rows = {"store_write": [], "plain_write": [], "store_read": [], "plain_read": []}
    for r in range(repeats):
        store = TeacherStore(f"{url}/run-{r}-{uuid.uuid4().hex[:6]}")
        fs = store.fs
        plain = f"{store.root}/plain"
        blobs = [s.to_bytes() for s in shards]
        fs.makedirs(plain, exist_ok=True)
        store.put_spec(spec)

        def store_write():
            store.commit_many(spec, shards)  # objects, entries (pipelined), then manifest.json

        def plain_write():
            for i, b in enumerate(blobs):
                fs.pipe_file(f"{plain}/shard-{i:05d}.safetensors", b)

        entries = None

        def store_read():
            for i in range(k):
                store.read_shard(spec.spec_hash, i, entries[i])

        def plain_read():
            for i in range(k):
                fs.cat_file(f"{plain}/shard-{i:05d}.safetensors")

        rows["plain_write"].append(_time(plain_write))
        rows["store_write"].append(_time(store_write))
        entries = store.manifest(spec.spec_hash)
        rows["plain_read"].append(_time(plain_read))
        rows["store_read"].append(_time(store_read))
    med = {k_: statistics.median(v) for k_, v in rows.items()}
    mb = nbytes / 2**20
    return {
        "url": url.split("/run-")[0], "shard_shape": list(shape), "trajectories_per_shard": per_shard, "shards": k,
        "dtype": dtype, "shard_MiB": round(mb / k, 3), "total_MiB": round(mb, 2),
        "write_MiB_s": {"store": round(mb / med["store_write"], 1), "plain": round(mb / med["plain_write"], 1)},
        "read_MiB_s": {"store": round(mb / med["store_read"], 1), "plain": round(mb / med["plain_read"], 1)},
        "write_ratio": round(med["plain_write"] / med["store_write"], 3),
        "read_ratio": round(med["plain_read"] / med["store_read"], 3),
    }


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
            for shape, dtype in (((1, 8, 8), "float32"), ((3, 32, 32), "float16")):
                for url in (tmp, "s3://bench/store"):
                    row = throughput(url, shape=shape, dtype=dtype, repeats=repeats)
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

def run_fd(trajectories: int, samples: int, seeds, shared_M: int, nfes=NFES, solvers=SOLVERS) -> dict:
    from amed_core.amed import SamplerSpec, TrainConfig, train_amed
    from amed_core.denoisers import load_teacher
    from amed_core.amed.checkpoint import Sampler
    from amed_core.metrics import fd_exact_gmm
    from flows.store import TeacherStore, generate

    teacher = load_teacher("digits-gmm")
    noise = torch.randn(samples, *teacher.shape, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    grid_for = ";".join(f"{s}:{','.join(map(str, nfes))}" for s in solvers)
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
                sampler = SamplerSpec.create(solver, nfe, afs=nfe % 2 == 1, denoiser=teacher)
                res = {"solver": solver, "nfe": nfe, "fd_regen": [], "fd_shared": []}
                for seed in seeds:
                    cfg = TrainConfig(num_trajectories=trajectories, seed=seed)
                    for kind in ("regen", "shared"):
                        batches = None if kind == "regen" else store.iter_batches(
                            spec.spec_hash, sampler.grid(), cfg.batch_size, seed=seed, dtype=torch.float64)
                        out = train_amed(teacher, sampler, cfg, batches=batches)
                        x = Sampler(sampler, out.predictor)(teacher, noise).x
                        res[f"fd_{kind}"].append(round(fd_exact_gmm(x, teacher), 4))
                res["fd_regen_mean"] = statistics.mean(res["fd_regen"])
                res["fd_shared_mean"] = statistics.mean(res["fd_shared"])
                print(json.dumps(res), flush=True)
                rows.append(res)
    return {"trajectories": trajectories, "samples": samples, "seeds": list(seeds), "shared_M": shared_M,
            "shared_spec": spec.spec_hash, "shared_generate_seconds": round(gen_s, 1),
            "shared_nfe_per_trajectory": summary.nfe_per_trajectory, "rows": rows}


def teacher_accuracy(samples: int, shared_M: int = 1, nfes=NFES, solvers=SOLVERS) -> dict:
    """FD (to the exact mixture moments) of each teacher's own final states at sigma_min: how accurate it is."""
    from amed_core.amed import SamplerSpec, TrainConfig
    from amed_core.amed.train import default_teacher
    from amed_core.denoisers import load_teacher
    from amed_core.metrics import fd_exact_gmm
    from amed_core.solvers import solve

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
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
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
        results["fd"] = run_fd(t, args.samples, list(range(args.seeds)), args.shared_M)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
