"""``amed distill [SWEEP.yaml]``: run a sweep on embedded defaults (the README's main-job command).

With no arguments it runs ``configs/quickstart.yaml``: an ephemeral Prefect (no server; its SQLite
database under the output folder), a local Ray on 127.0.0.1 started and stopped here, the store in
``<out>/store``, MLflow on SQLite (``<out>/mlflow.db``), the ``digits-gmm`` teacher, solvers
{amed, amed+ipndm} x NFE {3, 5}. Everything is written under ``--out`` (default
``./amed-runs/<sweep name>``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="run a sweep: teacher -> train -> evaluate -> register (default: quickstart)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", default=None, help="sweep YAML/JSON (default: configs/quickstart.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: ./amed-runs/<sweep name>)")
    p.add_argument("--store", dest="store_url", default=None, help="store URL (default: the sweep's store_url, else $AMED_STORE_URL, else <out>/store)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the sweep's mlflow_tracking_uri, else $MLFLOW_TRACKING_URI, "
                   "else sqlite:///<out>/mlflow.db); checked before any compute")
    p.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")
    p.add_argument("--summary-json", default=None, help="also write the run summary (results, timings) as JSON here")
    p.set_defaults(func=run)


def free_port(start: int, tries: int = 50) -> int:
    """The first port from ``start`` nobody listens on at 127.0.0.1 (the UI commands printed below; the local stack
    uses 4300/5300/5433/5400, Prefect's and MLflow's own defaults are 4200/5000)."""
    import socket

    for port in range(start, start + tries):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return start


def tool(name: str) -> str:
    """How to call the console script ``name`` installed next to this Python (``.venv/bin/prefect``): the bare name
    when that is the one the shell finds, else its path (relative to the current folder when inside it), so a printed
    command runs as written in the terminal the user typed ``.venv/bin/amed`` in."""
    import shutil

    mine = Path(sys.executable).parent / name
    if not mine.exists():
        return name
    found = shutil.which(name)
    if found and Path(found).resolve() == mine.resolve():
        return name
    try:
        rel = mine.absolute().relative_to(Path.cwd())
        return str(rel) if rel.parts[0] != ".." else str(mine.absolute())
    except ValueError:
        return str(mine.absolute())


def prefect_ui_command(prefect_home: str, port: int) -> str:
    """The command that serves the Prefect UI on this run's database (``<out>/prefect``) at 127.0.0.1:``port``.

    ``PREFECT_UI_API_URL`` names the server's own API: without it the UI's pages call Prefect's default API
    (127.0.0.1:4200, or whatever ``PREFECT_API_URL`` says), so they showed "Can't connect to Server API" or, where a
    user's own Prefect listens on 4200, that server's runs (issue 19)."""
    import shlex

    return (f"PREFECT_HOME={shlex.quote(str(prefect_home))} PREFECT_UI_API_URL=http://127.0.0.1:{port}/api "
            f"{tool('prefect')} server start --host 127.0.0.1 --port {port}")


def mlflow_ui_command(tracking_uri: str, port: int) -> str:
    """The command that serves the MLflow UI on this run's SQLite registry at 127.0.0.1:``port``."""
    import shlex

    return f"{tool('mlflow')} ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port {port}"


def run(args) -> int:
    """Ctrl-C (SIGINT) or SIGTERM stops the command within seconds with everything it started, and says what was kept
    (``flows.interrupt.StopOnSignal``); the flow runs in a thread so that the main thread is free to take the signal."""
    from flows.interrupt import StopOnSignal, kept_in_store

    where: dict = {}

    def kept() -> str:
        if "store" not in where:
            return "nothing yet (it stopped before its store was chosen)"
        return kept_in_store(where["store"], where.get("options"))

    with StopOnSignal("amed distill", kept) as stop:
        return _run(args, stop, where)


def _in_thread(fn, name: str):
    """``fn()`` in a thread while this (main) thread waits in short joins, so a signal handler runs at once."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.25)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _run(args, stop, where: dict) -> int:
    from flows.config import load_sweep, quickstart_path
    from flows.env import apply_safe_defaults

    apply_safe_defaults()
    import logging

    for noisy in ("httpx", "httpcore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    source = args.sweep or quickstart_path()
    cfg = load_sweep(source)  # ValueError -> "amed distill: error: ..." before anything starts
    out = Path(args.out or Path("amed-runs", cfg.name)).absolute()
    from flows.registry.tracking import check_registry, redact_uri, resolve_endpoints

    # flows.registry.tracking.PRECEDENCE: flag > sweep field > MLFLOW_TRACKING_URI / AMED_STORE_URL > under --out
    overrides = resolve_endpoints(cfg, tracking_uri=args.tracking_uri, store_url=args.store_url,
                                  default_tracking=f"sqlite:///{(out / 'mlflow.db').as_posix()}",
                                  default_store=str(out / "store"))
    if args.ray_address:
        overrides["compute"] = {**cfg.compute.model_dump(mode="json"), "ray_address": args.ray_address}
    cfg = load_sweep(cfg, **overrides)  # the flags validated too (e.g. no credentials in --store): nothing written yet
    from flows.storage.preflight import check_folder, check_teacher_space

    check_folder(out, what="--out")  # writable, with room for Prefect's and MLflow's databases: one line, before work
    from flows.storage.locks import hold_lock

    hold_lock(out / ".amed-distill.lock", f"output folder {out}")  # one run per folder; the kernel frees it on any exit
    registry = check_registry(cfg.mlflow_tracking_uri) if cfg.register_models else None  # before any compute
    from flows.storage.preflight import check_store

    check_store(cfg.store_url, cfg.storage_options)  # reachable and writable, before any compute
    where.update(store=cfg.store_url, options=cfg.storage_options)
    # Prefect and MLflow keep their state under the output folder (set before prefect is imported).
    os.environ.setdefault("PREFECT_HOME", str(out / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.mlflow_tracking_uri)
    server = os.environ.get("PREFECT_API_URL")
    print(f"amed distill: sweep {cfg.name!r} from {source}; writing under {out}", flush=True)
    print(f"amed distill: registry {registry or 'none (register_models: false)'}; store {cfg.store_url}", flush=True)

    # Start the ephemeral Prefect API (a thread) while the local Ray starts (this thread).
    warm_err: list[BaseException] = []
    marks = {"start": time.time()}

    def warm_prefect() -> None:
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                client.hello()
            marks["prefect_ready"] = time.time()
        except BaseException as e:  # noqa: BLE001 - reported below
            warm_err.append(e)

    from flows.env import import_thread_unsafe_modules

    import_thread_unsafe_modules()  # before the second thread: pydantic.v1 breaks when two threads import it at once
    warm = threading.Thread(target=warm_prefect, name="prefect-warmup", daemon=True)
    warm.start()
    from flows.cluster.schedule import PREFETCHED
    from flows.cluster.session import ray_session

    with ray_session(cfg.compute) as ray_info:
        stop.reinstall()  # ray.init put a SIGTERM handler of its own (sys.exit) in place of ours
        marks["ray_ready"] = time.time()
        if not server:  # the API is still starting: begin the work that needs nothing upstream
            from flows.plan import plan_sweep

            plan = plan_sweep(cfg)
            check_teacher_space(plan.teachers)  # a local store has room for the teacher, before it is generated
            PREFETCHED.start(plan, cfg.compute)
        warm.join()
        if warm_err:
            raise warm_err[0]
        from flows.distill import distill
        from flows.report import text_table

        marks["flow_start"] = time.time()

        def running(flow, flow_run, state) -> None:  # the run a signal marks cancelled
            stop.flow_run_id = str(flow_run.id)

        try:  # in a thread: Prefect's SIGTERM bridge (main thread only) stays out, our handlers take the signals
            summary = _in_thread(lambda: distill.with_options(on_running=[running])(cfg), "distill-flow")
        finally:
            PREFETCHED.clear()
        marks["flow_end"] = time.time()
    marks["end"] = time.time()
    wall = time.perf_counter() - t0
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps({**summary, "marks": marks, "wall_seconds_cli": wall}, indent=1))

    print()
    print(text_table(summary["table"]))
    if summary.get("best"):  # the champion across families per (teacher, NFE), next to the best training-free sampler
        print("\nbest per (teacher, NFE) across families (margin = value / best training-free):")
        print(text_table(summary["best"]))
    print()
    print(f"metric: {cfg.evaluation.metric} (lower is better), {cfg.evaluation.num_samples} samples; "
          f"'base' = the training-free base solver at the same NFE")
    print(f"work: {summary['work']}; wall {wall:.0f} s (Ray start {ray_info.seconds:.1f} s)")
    print("\nWritten:")
    print(f"  store         {summary['store_url']}  (teachers/, checkpoints/, evals/)")
    print(f"  results       {summary['results_url']}")
    print(f"  MLflow        {redact_uri(cfg.mlflow_tracking_uri)}")
    if not server:
        print(f"  Prefect       {os.environ['PREFECT_HOME']}  (ephemeral API's SQLite database)")
    if summary["champions"]:
        print("\nChampions (load with flows.registry.load_sampler(uri) or `amed fetch URI`):")
        for name, uri in summary["champions"].items():
            print(f"  {name:28s} {uri}")
    elif not cfg.register_models:
        print("\nNo models registered (register_models: false): winners are recorded in results.json only.")
    else:
        print("\nNo champion: no candidate has a finite score under this protocol (see results.json).")
    print("\nOpen the UIs on these runs:")
    if server:
        print(f"  Prefect: {server.rsplit('/api', 1)[0]}")
    else:
        port = free_port(4210)
        print(f"  Prefect: {prefect_ui_command(os.environ['PREFECT_HOME'], port)}   -> http://127.0.0.1:{port}")
    if cfg.mlflow_tracking_uri.startswith(("http://", "https://")):
        print(f"  MLflow:  {redact_uri(cfg.mlflow_tracking_uri)}")
    else:
        port = free_port(5010)
        print(f"  MLflow:  {mlflow_ui_command(cfg.mlflow_tracking_uri, port)}   -> http://127.0.0.1:{port}")
    sys.stdout.flush()
    return 0
