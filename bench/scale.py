"""How a sweep's cost grows with its size (issue 13, item 8).

Sweeps of 4, 16, 64, 256 candidates with tiny compute (the digits-gmm teacher, 256 trajectories in one shard,
2 optimiser updates per candidate, 1,000 evaluation samples), each run as ``distill(...)`` in a fresh process, exactly
as a deployment runs it (Prefect's API: the ephemeral one on SQLite by default, or the server at ``--prefect-api``,
e.g. the PostgreSQL stack's), on a local Ray (1 node) or a Ray cluster of ``--nodes`` nodes on this machine
(``ray.cluster_utils.Cluster``, reached through ``compute.ray_address``).

Per run: process wall, flow wall, compute (sum of the seconds Ray tasks spent in teacher/train/eval work, timed inside
the tasks) and its union over time, the orchestration overhead = flow wall - compute / slots (what a perfect packing of
the compute on ``slots`` parallel tasks would take), per candidate; the fixed overhead (process start, imports,
Prefect API, Ray start) = process wall - flow wall + the intercept of a fit of flow wall against size.
Micro-benchmarks split orchestration per candidate into Prefect task runs (a flow of N no-op tasks on the same API),
Ray scheduling (N no-op tasks on the same cluster), store I/O (the small objects a candidate writes and reads) and
MLflow (``--register-sizes``: the same sweep with registration on; seconds per candidate of the register stage).
Database sizes: the Prefect SQLite file (or PostgreSQL's pg_database_size) and MLflow's.

    .venv/bin/python bench/scale.py --sizes 4 16 64 256 --nodes 1 3 [--register-sizes 4 16] [--prefect-api URL]
        [--out bench/scale.json] [--plot bench/scale.png]

Results append to ``--out`` (JSON lines, one per run, with the machine and command) and the plot is redrawn from
every line there. Numbers depend on what else runs on the machine: each line records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {4: (["amed"], [3], 4), 16: (["amed", "amed+ipndm"], [3, 5], 4), 64: (["amed", "amed+ipndm"], [3, 5], 16),
          256: (["amed", "amed+ipndm"], [3, 5], 64)}


def sweep_config(n: int, store: str, tracking: str, address: str | None, register: bool, label: str = "") -> dict:
    solvers, nfes, seeds = SHAPES[n]
    return {
        "name": f"scale{n}{label and '-' + label}", "datasets": [{"name": "digits", "teacher": "digits-gmm", "model_id": f"scale{n}{label and '-' + label}"}],
        "solvers": solvers, "nfes": nfes, "seeds": list(range(seeds)),
        "teacher": {"num_trajectories": 256, "shard_size": 256, "M": 2},
        "train": {"batch_size": 128, "epochs": 1},
        "evaluation": {"num_samples": 1000, "batch_size": 1000, "grid_samples": 0},
        "panel": {"entries": [{"solver": "ipndm"}]},
        "register_models": register, "store_url": store, "mlflow_tracking_uri": tracking,
        "compute": {"ray_address": address, "num_cpus": 2, "max_parallel": 2, "teacher_actors": 1,
                    "cpus_per_task": 1, "torch_threads": 1, "task_retries": 1},
    }


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from flows.env import apply_safe_defaults
apply_safe_defaults()
from flows.distill import distill
t_import = time.perf_counter() - t0
cfg = json.loads(sys.argv[1])
out = distill(cfg)
keep = {k: out[k] for k in ("wall_seconds", "compute_seconds", "compute_cpu_seconds", "compute_spans", "work",
                            "ray_start_seconds")}
keep["import_seconds"] = t_import
keep["candidates"] = sum(1 for r in out["results"] if r.get("family", "amed") != "free")
print("SCALE " + json.dumps(keep))
"""


from pipeline import union_seconds  # noqa: E402  (bench/pipeline.py: one copy of the span union)


def pg_sizes(pg_url: str | None) -> dict:
    """pg_database_size of the stack's prefect and mlflow databases (``--pg-url``), else {}."""
    if not pg_url:
        return {}
    import sqlalchemy

    eng = sqlalchemy.create_engine(re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", pg_url))  # MLflow's driver
    try:
        with eng.connect() as con:
            return {f"pg_{db}_bytes": con.execute(sqlalchemy.text(f"select pg_database_size('{db}')")).scalar()
                    for db in ("prefect", "mlflow")}
    finally:
        eng.dispose()


LABEL = ""  # --label: appended to the sweep and model names, so repeated runs on one registry start from nothing


def run_sweep(n: int, work: Path, address: str | None, register: bool, prefect_api: str | None,
              tracking_uri: str | None = None) -> dict:
    work = work / f"run-{len(list(work.glob('run-*')))}"  # a fresh store each run: nothing cached from earlier runs
    work.mkdir(parents=True)
    store = work / f"store-{n}"
    db = work / f"mlflow-{n}.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(work / f"prefect-{n}"), PYTHONPATH=str(ROOT), PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    cfg = sweep_config(n, str(store), tracking_uri or f"sqlite:///{db}", address, register, LABEL)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE ")), None)
    if line is None:
        raise RuntimeError(f"sweep of {n} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rec = json.loads(line[6:])
    spans = rec.pop("compute_spans")
    compute = sum(rec["compute_seconds"].values())
    slots = 2
    rec.update(size=n, process_wall=wall, compute_total=compute, compute_union=union_seconds(spans),
               overhead=rec["wall_seconds"] - compute / slots, slots=slots)
    rec["overhead_per_candidate"] = rec["overhead"] / n
    rec["outside_flow"] = wall - rec["wall_seconds"]
    prefect_db = work / f"prefect-{n}" / "prefect.db"
    rec["prefect_db_bytes"] = prefect_db.stat().st_size if prefect_db.exists() else None
    rec["mlflow_db_bytes"] = db.stat().st_size if db.exists() else None
    rec["store_objects"] = sum(len(f) for _, _, f in os.walk(store))
    rec["store_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(store) for f in fs)
    return rec


PREFECT_MICRO = r"""
import json, sys, time
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
n = int(sys.argv[1])

@task
def noop(i: int) -> int:
    return i

@flow(task_runner=ThreadPoolTaskRunner(max_workers=32))
def many(n: int) -> float:
    t0 = time.perf_counter()
    futs = [noop.submit(i) for i in range(n)]
    [f.result() for f in futs]
    return time.perf_counter() - t0

many(2)
print("MICRO " + json.dumps({"seconds": many(n), "n": n}))
"""


def prefect_micro(n: int, work: Path, prefect_api: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(work / "prefect-micro"), PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    proc = subprocess.run([sys.executable, "-c", PREFECT_MICRO, str(n)], env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MICRO ")), None)
    if line is None:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(line[6:])["seconds"] / n


def _noop(i):
    return i


def ray_micro(n: int, address: str | None) -> float:
    import ray

    ray.init(address=address or "local", num_cpus=None if address else 2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        f = ray.remote(num_cpus=1)(_noop)
        ray.get([f.remote(i) for i in range(8)])  # workers up
        t0 = time.perf_counter()
        pending = [f.remote(i) for i in range(n)]
        ray.get(pending)
        return (time.perf_counter() - t0) / n
    finally:
        ray.shutdown()


def store_micro(work: Path, ops: int = 200) -> float:
    """Seconds of one small JSON put + get + exists on the local-folder run store (a candidate does about 10)."""
    from flows.storage import RunStore

    store = RunStore(str(work / "store-micro"))
    t0 = time.perf_counter()
    for i in range(ops):
        store.put_json(f"progress/x{i}.json", {"i": i, "step": 1})
        store.get_json(f"progress/x{i}.json")
        store.exists(f"evals/x{i}.json")
    return (time.perf_counter() - t0) / ops


def plot(lines: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    groups: dict[str, list[dict]] = {}
    for r in lines:
        if r.get("kind") == "sweep":
            groups.setdefault(f"{r['nodes']} node(s), {r['backend']}{', register' if r['register'] else ''}", []).append(r)
    for gi, (label, rs) in enumerate(sorted(groups.items())):
        rs = sorted({r["size"]: r for r in rs}.values(), key=lambda r: r["size"])  # the latest run of each size
        xs = [r["size"] for r in rs]
        color = plt.get_cmap("tab10")(gi % 10)  # one colour per setup: wall solid, compute dashed
        a1.plot(xs, [r["process_wall"] for r in rs], "o-", color=color, label=f"wall, {label}")
        a1.plot(xs, [r["compute_total"] / r["slots"] for r in rs], "x--", color=color, label=f"compute / slots, {label}")
        a2.plot(xs, [r["overhead_per_candidate"] for r in rs], "o-", color=color, label=label)
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xlabel("candidates")
        a.legend(fontsize=7)
    a1.set_yscale("log")
    a1.set_ylabel("seconds")
    a2.set_ylabel("orchestration seconds per candidate")
    a2.axhline(0.5, color="0.6", ls=":")
    fig.suptitle("bench/scale.py: sweep cost vs size (digits-gmm, tiny compute)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--register-sizes", type=int, nargs="*", default=[])
    ap.add_argument("--prefect-api", default=None, help="a Prefect server (e.g. the PostgreSQL stack's); default ephemeral")
    ap.add_argument("--tracking-uri", default=None, help="MLflow for the --register-sizes runs (e.g. the stack's "
                    "http://127.0.0.1:5300); default a SQLite file per run")
    ap.add_argument("--pg-url", default=None, help="SQLAlchemy URL of the stack's PostgreSQL (any database): records "
                    "pg_database_size of its prefect and mlflow databases after each run")
    ap.add_argument("--micro", type=int, default=256, help="tasks in the Prefect/Ray micro-benchmarks (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "scale.json"))
    ap.add_argument("--plot", default=str(ROOT / "bench" / "scale.png"))
    ap.add_argument("--label", default="", help="appended to sweep and registered model names (scale4-LABEL), so a run "
                    "against a registry that has an earlier run's models registers everything anew")
    args = ap.parse_args()
    global LABEL
    LABEL = args.label
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its Ray nodes (finally)
    from flows.env import apply_safe_defaults
    from flows.registry.tracking import redact_uri  # the --pg-url password never lands in scale.json

    apply_safe_defaults()
    machine = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "command": " ".join(redact_uri(a) for a in sys.argv), "backend": "postgres" if args.prefect_api else "sqlite"}
    out = Path(args.out)

    def emit(rec: dict) -> None:
        rec = {**machine, **rec, "loadavg": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        show = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                if k not in ("command", "machine", "python", "time")}
        print(json.dumps(show), flush=True)

    fits: dict[int, list[tuple[int, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="amed-scale-") as tmp:
        work = Path(tmp)
        for nodes in args.nodes:
            cluster, address = None, None
            if nodes > 1:
                from ray.cluster_utils import Cluster

                node_args = {"num_cpus": 1, "object_store_memory": 100_000_000, "include_dashboard": False}
                cluster = Cluster(initialize_head=True, connect=False, head_node_args=node_args)
                for _ in range(nodes - 1):
                    cluster.add_node(**node_args)
                cluster.wait_for_nodes()
                address = cluster.address
            try:
                if args.micro:
                    emit({"kind": "ray_micro", "nodes": nodes, "n": args.micro,
                          "seconds_per_task": ray_micro(args.micro, address)})
                for n in args.sizes:
                    rec = run_sweep(n, work, address, False, args.prefect_api)
                    emit({"kind": "sweep", "nodes": nodes, "register": False, **rec, **pg_sizes(args.pg_url)})
                    fits.setdefault(nodes, []).append((n, rec["process_wall"], rec["wall_seconds"]))
                for n in args.register_sizes:
                    rec = run_sweep(n, work, address, True, args.prefect_api, args.tracking_uri)
                    emit({"kind": "sweep", "nodes": nodes, "register": True, **rec, **pg_sizes(args.pg_url)})
            finally:
                if cluster is not None:
                    cluster.shutdown()
        if args.micro:
            emit({"kind": "prefect_micro", "n": args.micro, "seconds_per_task": prefect_micro(args.micro, work, args.prefect_api)})
            emit({"kind": "store_micro", "seconds_per_op": store_micro(work)})
    for nodes, pts in fits.items():  # fixed overhead = intercept of a least-squares line through (size, wall)
        if len(pts) >= 2:
            fixed = {}
            for k, name in ((1, "process"), (2, "flow")):
                xs, ys = [p[0] for p in pts], [p[k] for p in pts]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                fixed[f"{name}_intercept"], fixed[f"{name}_slope"] = my - slope * mx, slope
            emit({"kind": "fixed", "nodes": nodes, "sizes": [p[0] for p in pts], **fixed})
    lines = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
    plot(lines, Path(args.plot))
    print(f"appended to {out}; plot {args.plot}")


if __name__ == "__main__":
    main()
