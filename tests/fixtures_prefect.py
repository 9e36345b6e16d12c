"""Real Prefect and Ray for pipeline tests: the test harness (a temporary API on 127.0.0.1), a local Ray on
loopback (2 CPUs, small object store), and a real `prefect server` subprocess. Import the fixtures you use
into the test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.env import apply_safe_defaults

apply_safe_defaults()
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout} s: {log.read_text()[-3000:] if log else ''}")


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    """Flows run against a temporary Prefect API + SQLite; task results persist under a temporary folder."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(results)}):
            yield


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per module on 127.0.0.1: 2 CPUs, 300 MB object store; the flow reuses it."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=300_000_000, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 (own PREFECT_HOME); yields the env that points at it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_KEY", None)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc, log)
        yield env
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGINT (Prefect workers ignore SIGTERM for a while), then SIGKILL of the process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


def prefect_cli(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``prefect ARGS`` from the venv, in the repository root, with ``env`` (e.g. the prefect_server fixture's)."""
    return subprocess.run([str(VENV_BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def deploy_local(env: dict) -> None:
    """Create the process pool ``amed-local`` and deploy infra/prefect.yaml's ``local`` deployment on that server."""
    r = prefect_cli(env, "work-pool", "create", "amed-local", "--type", "process")
    assert r.returncode == 0 or "already exists" in r.stdout + r.stderr, r.stdout + r.stderr
    r = prefect_cli(env, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--name", "local")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "distill/local" in r.stdout


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    """A process worker for ``amed-local`` in its own session (stop it with :func:`stop`), output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", "amed-local"], env=env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def process_tree(*roots: int) -> list[int]:
    """``roots`` and all their descendants (read from /proc: flows.interrupt.process_tree), parents first."""
    from flows.interrupt import process_tree as descendants

    out: list[int] = []
    for root in roots:
        out += [p for p in [root, *descendants(root)] if p not in out]
    return out
