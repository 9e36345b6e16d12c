"""A real ``mlflow server`` on 127.0.0.1: SQLite backend store, artifacts proxied to the S3-protocol test
server (moto, from fixtures_s3). Import into a test module:

    from fixtures_s3 import s3_server  # noqa: F401
    from fixtures_mlflow import mlflow_server  # noqa: F401
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """Start ``mlflow server`` (SQLite + s3:// artifact destination on moto); yield (url, bucket)."""
    import s3fs

    bucket = f"mlflow-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    work = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_server, MLFLOW_DISABLE_TELEMETRY="true")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
           "--artifacts-destination", f"s3://{bucket}/mlartifacts"]
    logf = open(work / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                logf.flush()
                raise RuntimeError(f"mlflow server did not become healthy:\n{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, bucket
    finally:
        # The server runs gunicorn/uvicorn workers in its own session: stop that process group only.
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=5)
        logf.close()
