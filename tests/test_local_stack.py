"""infra/local-stack.sh end to end on 127.0.0.1: PostgreSQL, Prefect server and MLflow server on PostgreSQL, the
store and MLflow's artifacts on disk, the work pool and a worker; a flow, a store object and an MLflow run + model
version through the `env` exports; then the same stack again with auth on and S3 (moto) for the store (refused
without credentials, served with them), where the first run's artifacts are still served: `down` and `up` lose
nothing; the Prefect UI's pages call the server's own API; `down` leaves no process behind, no secret is printed or
logged; a failed `up` stops what it started, says so in one line, and `env` then refuses."""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fixtures_prefect import process_tree
from fixtures_readme import processes_naming as _processes_naming, running as _running

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infra" / "local-stack.sh"
PY = sys.executable

pytestmark = [pytest.mark.services, pytest.mark.slow]

CLIENT = r"""
import json, os, fsspec
from prefect import flow
from mlflow import MlflowClient
import mlflow

@flow(name="stack-probe")
def probe(x: int) -> int:
    return x + 1

state = probe(41, return_state=True)
out = {"flow_run_id": str(state.state_details.flow_run_id), "flow_result": state.result()}
mlflow.set_experiment("stack-probe")
with mlflow.start_run() as run:
    mlflow.log_param("solver", "amed")
    mlflow.log_metric("fd", 0.5)
    mlflow.log_text("predictor placeholder", "predictor/notes.txt")
client = MlflowClient()
client.create_registered_model("stack-probe-model")
mv = client.create_model_version("stack-probe-model", source=f"{run.info.artifact_uri}/predictor", run_id=run.info.run_id)
client.set_registered_model_alias("stack-probe-model", "champion", mv.version)
store = os.environ["AMED_STORE_URL"]
with fsspec.open(f"{store}/probe/notes.txt", "w") as f:
    f.write("kept by down and up")
out.update(run_id=run.info.run_id, version=mv.version, store=store, tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri(),
           champion=client.get_model_version_by_alias("stack-probe-model", "champion").version,
           aws=sorted(k for k in os.environ if k.startswith("AWS_")))
print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_installable() -> bool:
    if glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return True
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _clean_env() -> dict[str, str]:
    """A new terminal's environment: only the basics, so nothing earlier tests of the same process left in
    os.environ (PREFECT_HOME, MLFLOW_*, RAY_*, ...) can configure the stack or its clients behind the script's back."""
    keep = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TERM", "TMPDIR", "TZ")
    return {k: v for k, v in os.environ.items() if k in keep}


@pytest.fixture(scope="module")
def stack(request):
    if not _pg_installable():
        pytest.skip("PostgreSQL server binaries are missing and cannot be installed here (not root or no apt-get)")
    # PostgreSQL runs as the `postgres` user when we are root: its folder must be reachable (pytest's tmp is 0700)
    folder = Path(tempfile.mkdtemp(prefix="amed-stack-"))
    folder.chmod(0o711)
    env = _clean_env()
    env.update(AMED_STACK_DIR=str(folder / "stack"), AMED_PREFECT_PORT=str(_free_port()),
               AMED_MLFLOW_PORT=str(_free_port()), AMED_PG_PORT=str(_free_port()), AMED_S3_PORT=str(_free_port()),
               AMED_MLFLOW_WORKERS="1", AMED_STACK_TIMEOUT="150")
    yield env
    subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(folder, ignore_errors=True)


def _sh(env, *args, timeout=240, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        log_dir = Path(env["AMED_STACK_DIR"]) / "logs"
        logs = "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(log_dir.glob("*.log")))
        pytest.fail(f"local-stack.sh {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}{logs}")
    return r


def _http(url: str, auth: str | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _listeners(port: int) -> set[str]:
    """Local addresses listening on TCP `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


def _stack_pids(stack_dir: Path) -> set[int]:
    """PIDs recorded by the script and all their descendants."""
    return set(process_tree(*(int(p.read_text().split()[0]) for p in (stack_dir / "run").glob("*.pid"))))


def _down_and_check(env) -> str:
    stack_dir = Path(env["AMED_STACK_DIR"])
    pids = _stack_pids(stack_dir)
    assert len(pids) >= 4
    r = _sh(env, "down", timeout=120)
    left = [p for p in pids if _running(p)]
    assert not left, f"processes left after down: {left}\n{r.stdout}"
    assert not _processes_naming(str(stack_dir)), _processes_naming(str(stack_dir))
    for key in ("AMED_PG_PORT", "AMED_PREFECT_PORT", "AMED_MLFLOW_PORT", "AMED_S3_PORT"):
        assert not _listeners(int(env[key])), key
    again = _sh(env, "down")                      # idempotent
    status = _sh(env, "status", check=False)
    assert status.returncode != 0 and "up " not in status.stdout, status.stdout
    return r.stdout + r.stderr + again.stdout + again.stderr + status.stdout + status.stderr


def test_env_and_status_without_a_stack(tmp_path):
    env = _clean_env() | {"AMED_STACK_DIR": str(tmp_path / "none")}
    r = _sh(env, "env", check=False)
    assert r.returncode != 0 and "local-stack.sh up" in r.stderr
    r = _sh(env, "status", check=False)
    assert r.returncode != 0 and "postgres  down" in r.stdout
    assert _sh(env, "down").returncode == 0


def test_stack_up_use_auth_down(stack):
    env = stack
    stack_dir = Path(env["AMED_STACK_DIR"])
    prefect = f"http://127.0.0.1:{env['AMED_PREFECT_PORT']}"
    mlflow = f"http://127.0.0.1:{env['AMED_MLFLOW_PORT']}"
    printed = []

    # ---- 1. plain stack (loopback, no auth) -------------------------------------------------------------
    r = _sh(env, "up", check=False)
    if r.returncode == 3:
        pytest.skip(f"PostgreSQL could not be installed: {r.stderr.strip()}")
    if r.returncode != 0:
        _sh(env, "up")                                # reports the logs
    printed.append(r.stdout + r.stderr)
    assert prefect in r.stdout and mlflow in r.stdout
    assert _http(f"{prefect}/api/health") == (200, b"true")
    assert _http(f"{mlflow}/health")[0] == 200

    # the UI's pages call this server's API, not Prefect's default 127.0.0.1:4200 (issue 19: a blank UI)
    code, body = _http(f"{prefect}/ui-settings")
    assert code == 200 and json.loads(body)["api_url"] == f"{prefect}/api", body[:300]
    # every listener of the stack is on 127.0.0.1 only (0100007F in /proc/net/tcp); no S3 server by default
    for key in ("AMED_PG_PORT", "AMED_PREFECT_PORT", "AMED_MLFLOW_PORT"):
        assert _listeners(int(env[key])) == {"0100007F"}, (key, _listeners(int(env[key])))
    assert not _listeners(int(env["AMED_S3_PORT"]))

    # PostgreSQL: password auth for the role amed, over TCP
    import psycopg2

    pg_password = (stack_dir / "secrets" / "pg_password").read_text()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=env["AMED_PG_PORT"], user="amed", password="wrong", dbname="prefect")
    conn = psycopg2.connect(host="127.0.0.1", port=env["AMED_PG_PORT"], user="amed", password=pg_password,
                            dbname="postgres")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        assert {"prefect", "mlflow", "mlflow_auth"} <= {row[0] for row in cur.fetchall()}
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone()[0] == "127.0.0.1"
    conn.close()

    # a client shell: eval "$(infra/local-stack.sh env)", then a flow, an MLflow run, a model version
    r = _sh(env, "env")
    printed.append(r.stdout)
    assert f"export PREFECT_API_URL={prefect}/api" in r.stdout and f"export MLFLOW_TRACKING_URI={mlflow}" in r.stdout
    client = subprocess.run(["bash", "-c", f'exports="$(bash {SCRIPT} env)" || exit 9; eval "$exports" && exec {PY} -c "$CLIENT"'],
                            env=env | {"CLIENT": CLIENT, "MLFLOW_DISABLE_TELEMETRY": "true"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    lines = [x for x in client.stdout.splitlines() if x.startswith("RESULT ")]
    assert client.returncode == 0 and lines, client.stdout[-3000:] + client.stderr[-5000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["tracking_uri"] == mlflow and out["registry_uri"] == mlflow, out  # the stack's server, not ./mlflow.db
    assert out["flow_result"] == 42 and str(out["version"]) == "1" and str(out["champion"]) == "1", out
    # on disk under the stack folder: MLflow's artifacts (served by its server) and the store; no S3 settings
    assert out["store"] == str(stack_dir / "store") and out["aws"] == [], out
    assert (stack_dir / "store" / "probe" / "notes.txt").read_text() == "kept by down and up"
    assert [p.read_text() for p in (stack_dir / "mlflow" / "artifacts").rglob("notes.txt")] == ["predictor placeholder"]
    code, body = _http(f"{prefect}/api/flow_runs/{out['flow_run_id']}")
    assert code == 200 and json.loads(body)["state_type"] == "COMPLETED"           # recorded by the server
    code, body = _http(f"{prefect}/api/work_pools/amed-local")
    assert code == 200 and json.loads(body)["type"] == "process"

    printed.append(_down_and_check(env))

    # ---- 2. the same stack with auth on, a worker and S3 (moto) for the store; registry and artifacts kept ----
    env_auth = env | {"AMED_STACK_AUTH": "1", "AMED_STACK_S3": "moto"}
    r = _sh(env_auth, "up", "--worker")
    printed.append(r.stdout + r.stderr)
    secrets_dir = stack_dir / "secrets"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    secrets = {p.name: p.read_text() for p in secrets_dir.iterdir()}
    assert set(secrets) == {"pg_password", "prefect_auth_string", "mlflow_admin_password", "mlflow_secret_key"}
    assert all(stat.S_IMODE((secrets_dir / n).stat().st_mode) == 0o600 for n in secrets)
    prefect_auth = secrets["prefect_auth_string"]
    mlflow_auth = "admin:" + secrets["mlflow_admin_password"]

    for url, auth in ((f"{prefect}/api/admin/version", prefect_auth),
                      (f"{mlflow}/api/2.0/mlflow/registered-models/get?name=stack-probe-model", mlflow_auth)):
        assert _http(url)[0] in (401, 403), url
        assert _http(url, auth="admin:wrong")[0] in (401, 403), url
        assert _http(url, auth=auth)[0] == 200, url
    code, body = _http(f"{prefect}/api/flow_runs/{out['flow_run_id']}", auth=prefect_auth)   # kept in PostgreSQL
    assert code == 200 and json.loads(body)["state_type"] == "COMPLETED"
    code, body = _http(f"{mlflow}/api/2.0/mlflow/registered-models/get?name=stack-probe-model", auth=mlflow_auth)
    assert json.loads(body)["registered_model"]["aliases"][0] == {"alias": "champion", "version": "1"}
    code, body = _http(f"{prefect}/api/work_pools/amed-local/workers/filter", auth=prefect_auth, data=b"{}")
    assert code == 200 and any(w["status"] == "ONLINE" for w in json.loads(body))

    assert _listeners(int(env["AMED_S3_PORT"])) == {"0100007F"}
    status = _sh(env_auth, "status")
    printed.append(status.stdout)
    assert all(f"{s:<9} up" in status.stdout for s in ("postgres", "s3", "prefect", "mlflow", "worker")), status.stdout
    r = _sh(env_auth, "env")
    printed.append(r.stdout)
    assert "export PREFECT_API_AUTH_STRING=" in r.stdout and "export MLFLOW_TRACKING_PASSWORD=" in r.stdout
    # the exports work in a client shell: the MLflow and Prefect clients are served
    probe = ("import os, boto3, fsspec, mlflow; from mlflow import MlflowClient\n"
             "from prefect.client.orchestration import get_client\n"
             "print('MODELS', [m.name for m in MlflowClient().search_registered_models()])\n"
             "with get_client(sync_client=True) as c: print('POOL', c.read_work_pool('amed-local').name)\n"
             "got = mlflow.artifacts.download_artifacts('models:/stack-probe-model@champion')\n"
             "print('KEPT', open(os.path.join(got, 'notes.txt')).read())\n"
             "store = os.environ['AMED_STORE_URL']\n"
             "with fsspec.open(store + '/probe/s3.txt', 'w') as f: f.write('on moto')\n"
             "print('S3', store, [o['Key'] for o in boto3.client('s3').list_objects_v2(Bucket='amed-distill')['Contents']])\n")
    client = subprocess.run(["bash", "-c", f'exports="$(bash {SCRIPT} env)" || exit 9; eval "$exports" && exec {PY} -c "$PROBE"'],
                            env=env_auth | {"PROBE": probe, "MLFLOW_DISABLE_TELEMETRY": "true"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert "MODELS ['stack-probe-model']" in client.stdout and "POOL amed-local" in client.stdout, \
        client.stdout[-2000:] + client.stderr[-3000:]
    # the first stack's artifact, after down and up (moto kept them in memory before: `amed fetch` found nothing)
    assert "KEPT predictor placeholder" in client.stdout, client.stdout[-2000:] + client.stderr[-3000:]
    assert "S3 s3://amed-distill/store ['store/probe/s3.txt']" in client.stdout, client.stdout[-2000:]

    printed.append(_down_and_check(env_auth))

    # no secret in what the script printed, in its logs or in its records
    recorded = "".join(p.read_text(errors="replace") for p in (stack_dir / "logs").glob("*.log"))
    recorded += (stack_dir / "stack.env").read_text() + (stack_dir / "mlflow" / "basic_auth.ini").read_text()
    for name, value in secrets.items():
        bare = value.removeprefix("admin:")
        assert len(bare) >= 16
        assert bare not in "".join(printed), f"{name} printed"
        assert bare not in recorded, f"{name} in a log or record"


def test_failed_up_stops_what_it_started_and_env_refuses():
    """A failed `up` left PostgreSQL running and `env` still exported the URLs of services that were not running,
    so the README block's next lines ran against nothing (~60-line tracebacks). Now: one line on stderr, what this
    `up` started is stopped, exit 1; `env` refuses (no exports) while Prefect or MLflow is not running."""
    if not _pg_installable():
        pytest.skip("PostgreSQL server binaries are missing and cannot be installed here")
    folder = Path(tempfile.mkdtemp(prefix="amed-stack-fail-"))
    folder.chmod(0o711)
    stack_dir = folder / "stack"
    env = _clean_env()
    env.update(AMED_STACK_DIR=str(stack_dir), AMED_PREFECT_PORT=str(_free_port()), AMED_MLFLOW_PORT=str(_free_port()),
               AMED_PG_PORT=str(_free_port()), AMED_S3_PORT=str(_free_port()), AMED_STACK_TIMEOUT="150")
    try:
        with socket.socket() as taken:  # someone else's server on the Prefect port: `up` fails after PostgreSQL
            taken.bind(("127.0.0.1", int(env["AMED_PREFECT_PORT"])))
            taken.listen()
            r = _sh(env, "up", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "postgres started" in r.stdout, r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert f"prefect: port {env['AMED_PREFECT_PORT']} on 127.0.0.1 is taken" in lines[0], lines
        assert lines[0].endswith("; stopping what this up started (postgres)"), lines
        assert not _processes_naming(str(stack_dir)), _processes_naming(str(stack_dir))
        assert not _listeners(int(env["AMED_PG_PORT"]))
        assert not list((stack_dir / "run").glob("*.pid"))
        e = _sh(env, "env", check=False)
        assert e.returncode == 1 and e.stdout == "", e.stdout
        assert e.stderr.strip() == (f"infra/local-stack.sh: error: the stack in {stack_dir} is not up (prefect is not "
                                    "running): run 'infra/local-stack.sh up' first"), e.stderr
    finally:
        _sh(env, "down", check=False)
        shutil.rmtree(folder, ignore_errors=True)
