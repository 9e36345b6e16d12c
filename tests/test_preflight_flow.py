"""The distill flow's preflight (issue 14): registry and store from the one precedence (sweep field > worker
environment > default), and a dead registry stops the flow before any compute with one line."""

from __future__ import annotations

import socket
import time

import pytest

from flows.config import load_sweep

SWEEP = {"name": "preflight", "datasets": [{"name": "digits", "teacher": "digits-gmm"}], "solvers": ["amed"],
         "nfes": [3], "teacher": {"num_trajectories": 256, "shard_size": 128},
         "evaluation": {"num_samples": 256, "batch_size": 256}, "init": {"mode": "recipe"},
         "panel": {"expand": [], "rank_samples": 0}}


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Lines:
    """A logger stand-in that keeps the formatted lines."""

    def __init__(self):
        self.lines: list[str] = []

    def info(self, msg, *args):
        self.lines.append(msg % args)


def test_preflight_takes_the_workers_environment(tmp_path, monkeypatch):
    from flows.distill import _preflight

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env/mlflow.db")
    monkeypatch.setenv("AMED_STORE_URL", str(tmp_path / "env-store"))
    log = Lines()
    cfg = _preflight(load_sweep(SWEEP), log)
    assert cfg.mlflow_tracking_uri == f"sqlite:///{tmp_path}/env/mlflow.db" and cfg.store_url == str(tmp_path / "env-store")
    assert f"registry: local MLflow sqlite:///{tmp_path}/env/mlflow.db" in log.lines
    assert any(ln.startswith("store: ") and str(tmp_path / "env-store") in ln for ln in log.lines)
    # the sweep's own fields win over the environment
    own = load_sweep({**SWEEP, "mlflow_tracking_uri": f"sqlite:///{tmp_path}/own.db", "store_url": str(tmp_path / "own")})
    cfg = _preflight(own, Lines())
    assert (cfg.mlflow_tracking_uri, cfg.store_url) == (f"sqlite:///{tmp_path}/own.db", str(tmp_path / "own"))


def test_dead_registry_stops_before_compute(tmp_path, monkeypatch):
    from flows.distill import _preflight
    from flows.registry.tracking import RegistryUnreachable

    dead = _dead_url()
    cfg = load_sweep({**SWEEP, "mlflow_tracking_uri": dead, "store_url": str(tmp_path / "store")})
    t0 = time.perf_counter()
    with pytest.raises(RegistryUnreachable, match=f"MLflow registry {dead} cannot be reached"):
        _preflight(cfg, Lines())
    assert time.perf_counter() - t0 < 15 and not (tmp_path / "store").exists()
    # register_models: false needs no registry
    cfg = _preflight(cfg.model_copy(update={"register_models": False}), Lines())
    assert cfg.store_url == str(tmp_path / "store")
