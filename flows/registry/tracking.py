"""MLflow tracking: which server (the tracking URI), the fluent API pointed at it, experiments, params and metrics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

__all__ = ["QUICKSTART_DB", "QUICKSTART_TRACKING_URI", "default_tracking_uri", "resolve_tracking_uri", "tracking",
           "experiment", "flatten", "param_key", "log_params", "log_metrics"]

QUICKSTART_DB = Path("amed-runs", "quickstart", "mlflow.db")
QUICKSTART_TRACKING_URI = f"sqlite:///{QUICKSTART_DB.as_posix()}"
_PARAM_MAX = 6000  # MLflow's param value limit


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


@contextlib.contextmanager
def tracking(uri: str):
    """Point mlflow's fluent API (tracking + registry) at ``uri`` for the block, then restore."""
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    prev_t, prev_r = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(prev_t)
        mlflow.set_registry_uri(prev_r)



def experiment(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):  # no server: keep artifacts next to the database
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").absolute().as_uri()
    return client.create_experiment(name, artifact_location=location)


_TEACHERS: dict[str, Any] = {}  # (teacher, options) -> denoiser, reused across sweeps in one process


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

