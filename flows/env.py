"""Safe defaults for the services this package starts: loopback only, no telemetry, no token prompts.

Applied (with setdefault, so a user's explicit setting wins) by the `amed` CLI and the test suite.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os

SAFE_DEFAULTS = {
    # Ray: keep every listener on 127.0.0.1, no auth token prompt, no usage stats.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # A task that Ray's memory monitor kills is retried this many times, then fails with Ray's OutOfMemoryError
    # (Ray's default, -1, retries forever: a sweep whose training does not fit in memory never ended;
    # bench/reliability.py "ray-oom"). Read by the local Ray this package starts; set it on `ray start` for a cluster.
    "RAY_task_oom_retries": "3",
    # Prefect / MLflow: no analytics or telemetry leaving the machine.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Artifact transfers of a few small files: a progress bar per file is noise in logs.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Never reach a model hub at run time.
    "HF_HUB_OFFLINE": "1",
    # Large sweeps on the embedded (SQLite) Prefect API: hundreds of task runs at once made it answer 503 (database
    # busy) to tag-concurrency slot requests and the 256-candidate sweep of bench/scale.py failed; with more client
    # retries and a longer SQLite busy timeout it completes (BENCHMARKS.md "Scale"). Servers on PostgreSQL need neither.
    "PREFECT_CLIENT_MAX_RETRIES": "12",
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
}


def apply_safe_defaults() -> None:
    for key, value in SAFE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def import_thread_unsafe_modules() -> None:
    """Import, on the calling thread, the modules that two threads of this package's processes may import at once and
    that break when they do, before those threads start.

    ``pydantic.v1`` (Pydantic's v1 compatibility package) has circular imports inside: when one thread imports
    ``pydantic.v1`` (Prefect, validating a flow's parameters) while another imports ``pydantic.v1.fields`` (Ray,
    building its serialization context at the first task submission), Python 3.11 hands one of them the partly
    initialised module and the import fails (``ImportError: cannot import name 'Field' from partially initialized
    module``, a ``_DeadlockError``, or a ``KeyError: 'pydantic.v1'``). Two threads in a fresh interpreter doing
    exactly that fail every time (tests/test_imports.py); `amed distill` failed this way once in CI, its Prefect
    warm-up thread against the Ray submissions of the main thread. Costs ~40 ms once per process; a no-op where
    Pydantic has no v1 package."""
    try:
        import pydantic.v1.fields  # noqa: F401
    except ImportError:
        pass


@functools.cache  # once per process
def freeze_gc_at_exit() -> None:
    """At interpreter exit, move every live object into the garbage collector's permanent generation (``gc.freeze``)
    before Python tears the process down; registered once per process (``atexit``), no effect while it runs.

    Python's teardown runs full collections over every object still alive: with torch, Prefect, Ray and Pydantic loaded
    that is millions of objects, and a sweep's flow process spent 0.85-0.99 s after its flow had returned; with the
    freeze, 0.16-0.21 s (bench/scale.py's 4-candidate sweep, BENCHMARKS "Fixed overhead, third pass").
    Module globals are still released as usual; what the freeze skips is the collection of reference cycles that are
    garbage at exit, whose finalizers Python does not promise to run at exit anyway."""
    atexit.register(gc.freeze)
