"""PostgreSQL and an MLflow tracking server on it, on 127.0.0.1, for the at-scale tests (issue 13).

A throw-away cluster (initdb in a temporary folder, its own port, socket in a private folder; run as the `postgres`
OS user when the tests run as root, like infra/local-stack.sh), and ``mlflow server`` with that database as backend
and registry store and a local folder as artifact destination. Skipped when PostgreSQL's server binaries are absent.
Import the fixtures into a test module:

    from fixtures_postgres import postgres, mlflow_pg  # noqa: F401
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fixtures_mlflow import _free_port, _healthy  # one copy of the port and health helpers


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return str(Path(found[-1]).parent)
    initdb = shutil.which("initdb")
    return str(Path(initdb).parent) if initdb else None


def _as_pg(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 (trust auth for loopback TCP in this throw-away cluster). Yields
    ``{"port", "url": "postgresql://postgres@127.0.0.1:PORT", "createdb": callable(name) -> SQLAlchemy URL}``."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian: apt-get install postgresql)")
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        pytest.skip("running as root but there is no `postgres` OS user to run the server as")
    folder = Path(tempfile.mkdtemp(prefix="amed-pg-"))
    folder.chmod(0o711)
    data, sock = folder / "data", folder / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    logf = folder / "pg.log"
    subprocess.run(_as_pg([f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                           "--auth-local=trust", "--auth-host=trust"]), check=True, capture_output=True)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=200"
    subprocess.run(_as_pg([f"{bindir}/pg_ctl", "-D", str(data), "-l", str(logf), "-o", opts, "-w", "-t", "60", "start"]),
                   check=True, capture_output=True)

    def createdb(name: str) -> str:
        subprocess.run(_as_pg([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name]),
                       check=True, capture_output=True)
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"

    try:
        yield {"port": port, "url": f"postgresql://postgres@127.0.0.1:{port}", "createdb": createdb, "folder": folder}
    finally:
        subprocess.run(_as_pg([f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_pg(postgres, tmp_path_factory):
    """``mlflow server`` (2 workers) on a fresh PostgreSQL database; yields {"url", "db"} (db: the SQLAlchemy URL)."""
    db = postgres["createdb"]("mlflow")
    work = tmp_path_factory.mktemp("mlflow-pg")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "2", "--backend-store-uri", db, "--artifacts-destination", (work / "artifacts").as_uri()]
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"mlflow server did not become healthy:\n{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield {"url": url, "db": db, "log": work / "server.log"}
    finally:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()
