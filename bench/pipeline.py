"""Pipeline benchmark: where the quickstart's wall time goes, and how the train stage scales with Ray workers.

1. Runs ``amed distill --out <tmp>`` (the quickstart, exactly as a user does) and splits its wall time:
   compute = the union of the intervals in which some Ray task was doing denoiser/predictor work
   (teacher shards, training, sampling for evaluation; timed inside the tasks), orchestration = the rest
   (interpreter and imports, Prefect's API, Ray start and scheduling, store I/O, MLflow, shutdown).
2. Trains the quickstart's 4 predictors from one stored teacher on a local Ray with 1 and then 2 workers
   (``num_cpus`` = workers, one CPU and one torch thread per task) and reports the train stage's speedup.

    .venv/bin/python bench/pipeline.py [--train-epochs 2] [--write]   # --write: fill BENCHMARKS.md

Numbers depend on what else runs on the machine: the report prints the load average next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def union_seconds(spans: list[list[float]]) -> float:
    total, cur = 0.0, None
    for a, b in sorted(spans):
        if cur is None or a > cur[1]:
            if cur is not None:
                total += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (cur[1] - cur[0] if cur else 0.0)


def quickstart(tmp: Path) -> dict:
    summary = tmp / "summary.json"
    env = {**os.environ}
    for k in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    t_launch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "amed"), "distill", "--out", str(tmp / "qs"),
                           "--summary-json", str(summary)], cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"amed distill failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    m, spans = s["marks"], s["compute_spans"]
    compute = union_seconds(spans)
    first, last = min(a for a, _ in spans), max(b for _, b in spans)
    return {
        "wall": wall, "compute": compute, "orchestration": wall - compute,
        "compute_task_seconds": s["compute_seconds"], "compute_cpu_seconds": s.get("compute_cpu_seconds", 0.0),
        "phases": {
            "process start, imports, config": m["start"] - t_launch,
            f"config -> first compute (Ray ready at +{m['ray_ready'] - m['start']:.1f} s, Prefect API at "
            f"+{m['prefect_ready'] - m['start']:.1f} s; teacher and base-solver work start before the API is up)":
                first - m["start"],
            "gaps between compute (scheduling, worker start, store I/O)": (last - first) - compute,
            "last compute -> flow end (register: results.json, MLflow, artifacts)": m["flow_end"] - last,
            "shutdown (Ray, Prefect API) and exit": (t_launch + wall) - m["flow_end"],
        },
        "ray_start": s["ray_start_seconds"], "work": s["work"], "table": s["table"],
    }


def _burn(n: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - t


def cpu_parallelism(n: int = 10_000_000) -> float:
    """Throughput of 2 CPU-bound processes relative to 1 right now (2.0 on an idle 2-core box)."""
    import multiprocessing as mp

    one = _burn(n)
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_burn, [1000, 1000])  # start the processes before timing
        t = time.perf_counter()
        pool.map(_burn, [n, n])
        two = time.perf_counter() - t
    return 2 * one / two


def train_scaling(tmp: Path, epochs: int) -> dict:
    import ray

    from flows.cluster.jobs import train_job
    from flows.cluster.schedule import run_jobs
    from flows.cluster.session import prewarm, ray_session
    from flows.config import load_sweep, quickstart_path
    from flows.env import apply_safe_defaults
    from flows.plan import plan_sweep
    from flows.storage import TeacherStore, generate

    apply_safe_defaults()
    qs = load_sweep(quickstart_path())
    cfg = load_sweep(qs, store_url=str(tmp / "scaling-store"), train={**qs.train.model_dump(), "epochs": epochs},
                     train_options={k: {**v.model_dump(), "epochs": epochs} for k, v in qs.train_options.items()})
    plan = plan_sweep(cfg)
    from amed_core.adapters import load_teacher
    from amed_core.teacher import TeacherSpec

    t = plan.teachers[0]
    generate(TeacherStore(cfg.store_url), load_teacher(cfg.datasets[0].teacher), TeacherSpec.from_json(t.spec_json),
             progress=False)
    out = {}
    for workers in (1, 2):
        compute = cfg.compute.model_copy(update={"num_cpus": workers, "max_parallel": workers})
        jobs = [c.train.model_copy(update={"checkpoint": f"{c.train.checkpoint}-w{workers}", "id": f"{c.id}-w{workers}"})
                for c in plan.candidates]
        with ray_session(compute):
            ray.get(prewarm(workers))  # both runs start with warm workers
            t0 = time.perf_counter()
            recs = run_jobs(train_job, jobs, compute=compute, gpu=True, label="train")
            wall = time.perf_counter() - t0
        out[workers] = {"wall": wall, "task_seconds": sum(r["compute_seconds"] for r in recs)}
    out["speedup"] = out[1]["wall"] / out[2]["wall"]
    out["cpu_parallelism"] = cpu_parallelism()
    out["jobs"], out["epochs"], out["trajectories"] = len(plan.candidates), epochs, cfg.teacher.num_trajectories
    return out


def report(q: dict, sc: dict, load: tuple) -> str:
    machine = (f"{os.cpu_count()} CPU cores, {platform.python_version()}, load average before/after "
               f"{load[0]:.1f}/{load[1]:.1f}")
    lines = [f"Command: `.venv/bin/python bench/pipeline.py --train-epochs {sc['epochs']}` ({machine}).", "",
             f"`amed distill` (the quickstart, fresh output folder): **{q['wall']:.0f} s** wall, "
             f"of which compute {q['compute']:.0f} s ({100 * q['compute'] / q['wall']:.0f}%) and orchestration "
             f"{q['orchestration']:.0f} s ({100 * q['orchestration'] / q['wall']:.0f}%). Compute = union of the intervals in "
             "which a Ray task did denoiser/predictor work (timed inside the tasks); task-seconds: " +
             ", ".join(f"{k} {v:.0f}" for k, v in q["compute_task_seconds"].items()) +
             f" (CPU-seconds inside those intervals: {q['compute_cpu_seconds']:.0f} of "
             f"{sum(q['compute_task_seconds'].values()):.0f}; the gap is time the tasks waited for a core).", "",
             "| phase (wall) | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in q["phases"].items()]
    lines += [f"| compute (union of task intervals) | {q['compute']:.1f} |", "",
              f"Train stage, {sc['jobs']} predictors x {sc['trajectories']} trajectories x {sc['epochs']} epochs, "
              "one stored teacher, local Ray (1 CPU + 1 torch thread per task):", "",
              "| Ray workers | wall (s) | task-seconds | speedup |", "|---:|---:|---:|---:|",
              f"| 1 | {sc[1]['wall']:.1f} | {sc[1]['task_seconds']:.1f} | 1.00 |",
              f"| 2 | {sc[2]['wall']:.1f} | {sc[2]['task_seconds']:.1f} | {sc['speedup']:.2f} |", "",
              f"What the box offered at that moment: 2 CPU-bound processes ran {sc['cpu_parallelism']:.2f}x the throughput "
              "of one (2.00 on an idle 2-core box); the train stage's speedup is bounded by that."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-epochs", type=int, default=2, help="epochs per predictor in the scaling part")
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace the Pipeline section's _pending_ in BENCHMARKS.md")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="amed-bench-pipeline-") as d:
        tmp = Path(d)
        q = quickstart(tmp) if not args.skip_quickstart else None
        if q:
            print(json.dumps({k: v for k, v in q.items() if k != "table"}, indent=1), flush=True)
        sc = train_scaling(tmp, args.train_epochs)
        print(json.dumps(sc, indent=1), flush=True)
    text = report(q, sc, (load0, os.getloadavg()[0])) if q else json.dumps(sc)
    print("\n" + text)
    if args.write and q:
        bm = ROOT / "BENCHMARKS.md"
        body = bm.read_text()
        head = "## Pipeline (bench/pipeline.py)\n"
        i = body.index(head) + len(head)
        if not body[i:].startswith("_pending_"):
            raise SystemExit("BENCHMARKS.md: the Pipeline section is not _pending_; edit it by hand")
        bm.write_text(body[:i] + text + body[i + len("_pending_"):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
