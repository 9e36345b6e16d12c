"""MLflow tracking: which server (the tracking URI), the fluent API pointed at it, experiments, params and metrics."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["QUICKSTART_DB", "QUICKSTART_TRACKING_URI", "STORE_ENV", "PRECEDENCE", "RegistryUnreachable",
           "default_tracking_uri", "resolve_tracking_uri", "resolve_store_url", "resolve_endpoints", "check_registry",
           "redact_uri", "ensure_local_registry", "tracking", "experiment", "flatten", "param_key", "log_params",
           "log_metrics"]

log = logging.getLogger(__name__)

QUICKSTART_DB = Path("amed-runs", "quickstart", "mlflow.db")
QUICKSTART_TRACKING_URI = f"sqlite:///{QUICKSTART_DB.as_posix()}"
_PARAM_MAX = 6000  # MLflow's param value limit
STORE_ENV = "AMED_STORE_URL"
#: The one precedence for where a sweep registers and stores (``amed distill``, the deployments, ``amed fetch``).
PRECEDENCE = ("explicit (CLI flag / function argument) > sweep field (mlflow_tracking_uri, store_url) > "
              "environment (MLFLOW_TRACKING_URI, AMED_STORE_URL) > embedded default (SQLite / folder under the run folder)")


def default_tracking_uri(sweep_name: str) -> str:
    """``sqlite:///<cwd>/amed-runs/<sweep>/mlflow.db`` (the quickstart's: ``amed-runs/quickstart/mlflow.db``)."""
    return f"sqlite:///{Path('amed-runs', sweep_name, 'mlflow.db').absolute().as_posix()}"


def resolve_tracking_uri(explicit: Optional[str] = None, *, config=None) -> str:
    """Explicit > sweep config > $MLFLOW_TRACKING_URI > the sweep's (or, without one, the quickstart's) SQLite file.

    Without a config, the quickstart's database is used only when it exists in the current folder;
    otherwise ValueError says how to point at a tracking server.
    """
    if explicit:
        return explicit
    if config is not None and getattr(config, "mlflow_tracking_uri", None):
        return config.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if config is not None:
        return default_tracking_uri(config.name)
    if QUICKSTART_DB.is_file():
        return f"sqlite:///{QUICKSTART_DB.absolute().as_posix()}"
    raise ValueError("no MLflow tracking URI: pass --tracking-uri, set MLFLOW_TRACKING_URI, or run in the folder where "
                     f"`amed distill` wrote {QUICKSTART_DB}")


def resolve_store_url(explicit: Optional[str] = None, *, config=None, default: Optional[str] = None) -> str:
    """Explicit > the sweep's ``store_url`` > ``$AMED_STORE_URL`` > ``default`` (else ``./amed-runs/<sweep>/store``)."""
    if explicit:
        return explicit
    if config is not None and getattr(config, "store_url", None):
        return config.store_url
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    if default:
        return default
    if config is None:
        raise ValueError(f"no store URL: pass --store, set store_url in the sweep or ${STORE_ENV}")
    return str(Path("amed-runs", config.name, "store").absolute())


def resolve_endpoints(config, *, tracking_uri: Optional[str] = None, store_url: Optional[str] = None,
                      default_tracking: Optional[str] = None, default_store: Optional[str] = None) -> dict[str, str]:
    """``{"mlflow_tracking_uri", "store_url"}`` for a sweep under :data:`PRECEDENCE` (load_sweep overrides)."""
    uri = tracking_uri or getattr(config, "mlflow_tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") \
        or default_tracking or default_tracking_uri(config.name)
    return {"mlflow_tracking_uri": uri, "store_url": resolve_store_url(store_url, config=config, default=default_store)}


def redact_uri(uri: str) -> str:
    """``uri`` without a password (``http://user:***@host``) for logs and artifacts."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", str(uri))


class RegistryUnreachable(ValueError):
    """The configured MLflow tracking server / registry cannot be used (raised before any compute)."""


def check_registry(uri: str, timeout: float = 10.0) -> str:
    """Preflight: prove the MLflow registry at ``uri`` answers before a long sweep starts; return a one-line description.

    - ``http(s)://``: one registry API call (``registered-models/search``, credentials from
      ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``) within ``timeout`` seconds; a server that
      does not answer, refuses the credentials or is not MLflow raises.
    - ``sqlite:///PATH``: the database's folder exists or can be created and is writable.
    - ``file:`` / a plain path: the folder can be created and written.
    - other schemes (``databricks``, plugins): not checked here (returned as such).

    Raises :class:`RegistryUnreachable` (a ValueError) with one line naming the URI, the cause and the fix.
    """
    import base64
    import urllib.error
    import urllib.request

    uri = str(uri)
    shown = redact_uri(uri)
    fix = "start it (infra/local-stack.sh up) or point MLFLOW_TRACKING_URI / --tracking-uri / mlflow_tracking_uri at a live one"
    if uri.startswith(("http://", "https://")):
        from urllib.parse import unquote, urlsplit, urlunsplit

        parts = urlsplit(uri)  # user:password@ in the URI: sent as Basic auth (urllib would take it for the host name)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else (parts.hostname or "")
        netloc = host + (f":{parts.port}" if parts.port else "")
        url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")) + \
            "/api/2.0/mlflow/registered-models/search?max_results=1"
        req = urllib.request.Request(url, headers={"Accept": "application/json"})
        user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if parts.username is not None and not (user and pw):
            user, pw = unquote(parts.username), unquote(parts.password or "")
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        if user and pw:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode())
        elif token:
            req.add_header("Authorization", f"Bearer {token}")
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read(1 << 16)
            json.loads(body or b"{}")
        except urllib.error.HTTPError as e:
            why = {401: "credentials refused (set MLFLOW_TRACKING_USERNAME/PASSWORD)", 403: "access denied",
                   404: "no MLflow registry API there"}.get(e.code, f"HTTP {e.code}")
            raise RegistryUnreachable(f"MLflow registry {shown} is not usable: {why}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RegistryUnreachable(f"MLflow registry {shown} cannot be reached within {timeout:g} s ({reason}): "
                                      f"{fix}") from None
        except ValueError:
            raise RegistryUnreachable(f"MLflow registry {shown} answered, but not as an MLflow server: {fix}") from None
        return f"MLflow server {shown} (answered in {time.perf_counter() - t0:.2f} s)"
    if uri.startswith("sqlite:///") or uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri.removeprefix("file://").removeprefix("file:"))
        folder = path.parent if uri.startswith("sqlite:///") else path
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ok = os.access(folder, os.W_OK)
        except OSError as e:
            raise RegistryUnreachable(f"MLflow registry {shown}: cannot create {folder} ({e.strerror})") from None
        if not ok:
            raise RegistryUnreachable(f"MLflow registry {shown}: {folder} is not writable")
        return f"local MLflow {shown}"
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in _registry_schemes():
        raise RegistryUnreachable(f"MLflow registry {shown}: unknown scheme {scheme!r}; use http(s)://HOST:PORT, "
                                  "sqlite:///PATH.db or a database URI (postgresql://, mysql://)")
    return f"MLflow {shown} (scheme not checked)"


def _registry_schemes() -> set[str]:
    """URI schemes MLflow's model registry accepts (built in, plus plugins' entry points)."""
    from importlib.metadata import entry_points

    builtin = {"http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc"}
    return builtin | {ep.name for ep in entry_points(group="mlflow.model_registry_store")}


# ---------------------------------------------------------------------------------------------------------------
# The local registry's SQLite database: created whole or not at all.

_TMP_MARK = ".creating-"


def _sqlite_path(uri: str) -> Optional[Path]:
    if not str(uri).startswith("sqlite:///"):
        return None
    path = Path(str(uri)[len("sqlite:///"):].split("?", 1)[0])
    return None if not path.name or path.name == ":memory:" else path


@functools.cache
def _head_revision() -> Optional[str]:
    """The schema revision this MLflow creates (None if MLflow no longer says: then only leftovers are detected)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return _get_latest_schema_revision()
    except Exception:  # noqa: BLE001 - a private helper of MLflow's: detection falls back to the leftovers
        return None


_DATA_TABLES = ("runs", "registered_models", "model_versions", "logged_models", "trace_info")


def _db_state(path: Path) -> str:
    """``absent``, ``complete``, ``half-created`` (MLflow's table creation did not finish: a schema revision that is not
    this MLflow's head or ``_alembic_tmp_*`` tables left by a batch migration, and no data in it), ``outdated`` (an
    older schema with data: MLflow's own message says to run ``mlflow db upgrade``) or ``foreign`` (not SQLite)."""
    import sqlite3

    if not os.path.lexists(path):
        return "absent"
    if os.path.getsize(path) == 0:
        return "half-created"  # killed before SQLite wrote its first page
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)  # read-write: rolls back a hot journal
    except sqlite3.Error:
        return "foreign"
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        try:
            version = con.execute("select version_num from alembic_version").fetchone() if "alembic_version" in tables \
                else None
        except sqlite3.Error:
            version = None
        leftovers = any(t.startswith("_alembic_tmp_") for t in tables)
        head = _head_revision()
        if not leftovers and version is not None and (head is None or version[0] == head):
            return "complete"
        data = 0
        for t in _DATA_TABLES:
            if t in tables:
                data += con.execute(f"select count(*) from {t}").fetchone()[0]  # noqa: S608 - fixed names
        if "experiments" in tables:
            data += con.execute("select count(*) from experiments where experiment_id != 0").fetchone()[0]
        return "outdated" if data else "half-created"
    except sqlite3.DatabaseError:
        return "foreign"
    finally:
        con.close()


def _remove_db(path: Path) -> None:
    """The database file and SQLite's side files (a stale hot journal must never meet a new database)."""
    for p in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _remove_stale_temps(path: Path) -> None:
    """Temporary databases of creators that were killed (their pid is gone on this host)."""
    from flows.storage.locks import pid_alive

    prefix = f".{path.name}{_TMP_MARK}"
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path.parent):
            if name.startswith(prefix):
                pid = name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    _remove_db(path.parent / name)


def ensure_local_registry(uri: str) -> None:
    """For ``sqlite:///PATH``: make PATH a complete MLflow database, never a half-created one.

    MLflow creates a new database by running its migrations in place, for seconds; a process killed meanwhile left
    ``_alembic_tmp_*`` tables and a schema that every later use failed on ("table _alembic_tmp_trace_info already
    exists", issue 20). Here the database is built in a temporary file next to PATH (``.mlflow.db.creating-<pid>-...``)
    and hard-linked into place only when complete (atomic; a concurrent creator's database wins, ours is dropped).
    A database at PATH that an older amed or plain MLflow left half-created (no data in it) is removed and rebuilt, with
    a warning; one with data is never touched (MLflow names the upgrade it needs). Temporary files of killed creators
    are removed. Other URIs: nothing to do."""
    path = _sqlite_path(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    state = _db_state(path)
    if state in ("complete", "outdated"):
        return
    if state == "foreign":
        raise ValueError(f"{path} is not an MLflow SQLite database; move it away or point --tracking-uri elsewhere")
    if state == "half-created":
        log.warning("MLflow database %s was left half-created by a killed run (no data in it): rebuilding it", path)
        _remove_db(path)
    _create_atomically(path)


def _create_atomically(path: Path) -> None:
    import uuid

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "mlartifacts").absolute().as_uri())
        store.engine.dispose()
        getattr(SqlAlchemyStore, "_db_uri_sql_alchemy_engine_map", {}).pop(f"sqlite:///{tmp}", None)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, never over an existing database (a concurrent creator's)
        except FileExistsError:
            pass
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        _remove_db(tmp)


@contextlib.contextmanager
def tracking(uri: str):
    """Point mlflow's fluent API (tracking + registry) at ``uri`` for the block, then restore, environment included.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` also write ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``
    into ``os.environ``; restoring with them alone left MLflow's default (``sqlite:///<cwd>/mlflow.db``) in the
    environment, so the next lookup of this process (``amed fetch``'s summary) read that empty database, created it in
    the user's folder and printed "version None" (issue 19). The variables are put back as they were. A local SQLite
    registry is created (or rebuilt from a killed creation) first, atomically: :func:`ensure_local_registry`."""
    import mlflow

    ensure_local_registry(uri)
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    prev_t, prev_r = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(prev_t)
        mlflow.set_registry_uri(prev_r)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



def experiment(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):  # no server: keep artifacts next to the database
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").absolute().as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys; lists/None as JSON; values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = "{}"
        return out
    text = json.dumps(d) if isinstance(d, (list, tuple)) or d is None else str(d)
    out[prefix[:-1]] = text[:_PARAM_MAX]
    return out


def param_key(k: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", k)[:250]


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(param_key(k), v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client, run_id: str, values: dict[str, float], curves: Optional[dict[str, list[float]]] = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None and math.isfinite(float(v))]
    for name, ys in (curves or {}).items():
        ms += [Metric(name, float(y), now, i) for i, y in enumerate(ys) if math.isfinite(float(y))]
    for i in range(0, len(ms), 1000):
        client.log_batch(run_id, metrics=ms[i:i + 1000])

