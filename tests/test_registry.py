"""Registry on real MLflow: SQLite in tmp (tracking, versions, champion rule, fetch -> sample) and one
sweep against a real `mlflow server` whose artifacts live on the S3-protocol test server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from amed_core.amed import AMEDPredictor, SamplerSpec, save_checkpoint
from amed_core.amed import load_sampler as load_local
from amed_core.denoisers import load_teacher
from amed_core.teacher import trajectory_inputs
from fixtures_mlflow import mlflow_server  # noqa: F401
from fixtures_s3 import s3_server  # noqa: F401
from flows.config import load_sweep
from flows.results import CandidateResult, EvalProtocol

PROTO = EvalProtocol(metric="fd_exact", num_samples=64, seed=1000, reference="digits-gmm")


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


def _config(name: str, tracking_uri: str):
    return load_sweep({"name": name, "datasets": [{"name": "digits", "teacher": "digits-gmm"}],
                       "solvers": ["amed", "amed+ipndm"], "nfes": [3], "mlflow_tracking_uri": tracking_uri})


def _png() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _candidate(root: Path, teacher, *, solver: str, seed: int, value: float, protocol=PROTO) -> CandidateResult:
    """A real checkpoint (predictor weights from ``seed``), scored ``value`` under ``protocol``."""
    spec = SamplerSpec.create(solver, 3, afs=True, denoiser=teacher)
    ckpt = save_checkpoint(root / f"{solver.replace('+', '-')}-s{seed}-{value}", AMEDPredictor(spec.predictor, seed=seed), spec)
    grid = ckpt / "samples.png"
    grid.write_bytes(_png())
    return CandidateResult(dataset="digits", solver=solver, base_solver=spec.base_solver, nfe=3, seed=seed,
                           checkpoint_url=str(ckpt), protocol=protocol, value=value, base_value=1.0, rmse=0.1,
                           train_seconds=1.5, teacher_nfe=1234, loss_history=[0.9, 0.5, 0.25],
                           artifacts={"samples.png": str(grid)}, sampler_spec=spec.to_dict())


def _samples(sampler, teacher, seeds=(1000, 1001, 1002)):
    noise, _ = trajectory_inputs(list(seeds), teacher.shape)
    return sampler(teacher, noise).x


def test_sweep_tracking_registry_champion_and_fetch(tmp_path, teacher, capsys):
    import mlflow

    from flows.cli import main
    from flows.registry import load_sampler, log_sweep, promote, register_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config("regtest", uri)
    name = "amed-digits-nfe3"
    a = _candidate(tmp_path, teacher, solver="amed", seed=0, value=0.5)
    b = _candidate(tmp_path, teacher, solver="amed+ipndm", seed=0, value=0.3)
    c = _candidate(tmp_path, teacher, solver="amed", seed=1, value=0.4)
    assert a.registered_name == name

    # -- sweep 1: tracking, versions, aliases ---------------------------------------------------
    res = log_sweep(cfg, [a, b, c])
    assert res.champions == {name: f"models:/{name}@champion"}
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {str(v): client.get_model_version(name, v) for _, v in res.versions}
    assert len(versions) == 3
    vb = next(v for v, mv in versions.items() if mv.tags["solver"] == "amed+ipndm")
    vc = next(v for v, mv in versions.items() if mv.tags["solver"] == "amed" and mv.tags["seed"] == "1")
    assert str(client.get_model_version_by_alias(name, "champion").version) == vb
    assert str(client.get_model_version_by_alias(name, "best-amed").version) == vc          # 0.4 beat 0.5
    assert str(client.get_model_version_by_alias(name, "best-amed-ipndm").version) == vb
    mv = versions[vb]
    assert mv.tags["metric"] == "fd_exact" and mv.tags["protocol_hash"] == PROTO.hash and mv.tags["seed"] == "0"

    parent = client.get_run(res.parent_run_id)
    assert parent.data.params["train.lr"] == str(cfg.train.lr)
    children = client.search_runs([res.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(children) == 3
    child = client.get_run(res.child_run_ids[1])  # candidate b
    assert child.data.metrics["fd_exact"] == 0.3 and child.data.metrics["base_fd_exact"] == 1.0
    assert child.data.metrics["teacher_nfe"] == 1234 and child.data.metrics["train_seconds"] == 1.5
    assert child.data.params["candidate.solver"] == "amed+ipndm" and child.data.params["evaluation.metric"] == "fd_exact"
    assert [m.value for m in client.get_metric_history(child.info.run_id, "train_loss")] == [0.9, 0.5, 0.25]
    arts = {f.path for d in ("checkpoint", "plots") for f in client.list_artifacts(child.info.run_id, d)}
    assert {"checkpoint/predictor.safetensors", "checkpoint/sampler.json", "plots/samples.png", "plots/schedule.png"} <= arts

    # -- sweep 2: a worse candidate and a "better" one under another protocol leave the champion;
    #    a strictly better one on the same protocol takes it -----------------------------------
    worse = _candidate(tmp_path, teacher, solver="amed", seed=2, value=0.35)
    other = _candidate(tmp_path, teacher, solver="amed", seed=3, value=0.01,
                       protocol=EvalProtocol(metric="fd_exact", num_samples=8, seed=1000, reference="digits-gmm"))
    champs = register_sweep(cfg, [worse, other])
    assert champs == {name: f"models:/{name}@champion"}
    assert str(client.get_model_version_by_alias(name, "champion").version) == vb
    tie = _candidate(tmp_path, teacher, solver="amed", seed=4, value=0.3)
    register_sweep(cfg, [tie])
    assert str(client.get_model_version_by_alias(name, "champion").version) == vb  # equal is not strictly better
    better = _candidate(tmp_path, teacher, solver="amed", seed=5, value=0.2)
    res3 = log_sweep(cfg, [better])
    v_better = res3.versions[0][1]
    assert res3.moved == {name: True}
    assert str(client.get_model_version_by_alias(name, "champion").version) == v_better
    assert str(client.get_model_version_by_alias(name, "best-amed").version) == v_better
    assert str(client.get_model_version_by_alias(name, "best-amed-ipndm").version) == vb

    # a retried register stage adds no duplicate version
    n_before = len(client.search_model_versions(f"name='{name}'"))
    register_sweep(cfg, [better])
    assert len(client.search_model_versions(f"name='{name}'")) == n_before

    # -- after a protocol change: promote by hand, then sweeps compare under the new protocol ------------
    v_other = next(v.version for v in client.search_model_versions(f"name='{name}'") if v.tags.get("seed") == "3")
    assert main(["promote", f"models:/{name}/{v_other}", "--tracking-uri", uri]) == 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(v_other)
    new_proto = other.protocol
    register_sweep(cfg, [_candidate(tmp_path, teacher, solver="amed", seed=6, value=0.02, protocol=new_proto)])
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(v_other)  # 0.02 > 0.01
    res4 = log_sweep(cfg, [_candidate(tmp_path, teacher, solver="amed", seed=7, value=0.005, protocol=new_proto)])
    assert str(client.get_model_version_by_alias(name, "champion").version) == res4.versions[0][1]
    assert promote(f"models:/{name}/{v_better}", tracking_uri=uri)["previous"] == res4.versions[0][1]  # back
    with pytest.raises(ValueError, match="models:/NAME/VERSION"):
        promote(f"models:/{name}@champion", tracking_uri=uri)
    with pytest.raises(ValueError, match="no such registered version"):
        promote(f"models:/{name}/999", tracking_uri=uri)

    # -- fetch -> sample reproduces the candidate's samples exactly ----------------------------
    want = _samples(load_local(better.checkpoint_url), teacher)
    out = tmp_path / "fetched"
    capsys.readouterr()
    assert main(["fetch", f"models:/{name}@champion", "--out", str(out), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    champ = client.get_model_version_by_alias(name, "champion")
    # what was fetched: model, version, alias, method, NFE, metric value, teacher identity
    assert f"model    {name} version {champ.version} (fetched as @champion; aliases: " in printed, printed
    assert f"method   {champ.tags['solver']}  NFE 3" in printed
    assert f"metric   {champ.tags['metric']} {float(champ.tags['value']):.4g}" in printed
    assert "teacher  digits-gmm (adapter gmm, sha256 " in printed and str(out) in printed
    # the champion is named on the model itself (the Models list truncates aliases)
    model = client.get_registered_model(name)
    assert model.tags["champion"].startswith(f"v{champ.version} ({champ.tags['solver']}, ")
    assert model.description.splitlines()[0] == f"champion: {model.tags['champion']}"
    assert sorted(p.name for p in out.iterdir()) == ["predictor.safetensors", "sampler.json"]
    assert torch.equal(_samples(load_local(out), teacher), want)
    assert torch.equal(_samples(load_sampler(f"models:/{name}@champion", tracking_uri=uri), teacher), want)
    assert torch.equal(_samples(load_sampler(f"models:/{name}/{vb}", tracking_uri=uri), teacher),
                       _samples(load_local(b.checkpoint_url), teacher))
    assert torch.equal(_samples(load_sampler(f"file://{better.checkpoint_url}"), teacher), want)
    # the registered pyfunc (models-from-code, no pickle) gives the same samples from seeds
    import pandas as pd

    with _tracking_env(uri):
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        got = model.predict(pd.DataFrame({"seed": [1000, 1001, 1002]}))
    assert got.shape == (3, *teacher.shape)  # (seeds, C, H, W), as documented (flows/mlflow_model.py; README)
    np.testing.assert_array_equal(got, want.numpy())

    # bad addresses are ValueErrors that say what is wrong
    with pytest.raises(ValueError, match="cannot resolve"):
        load_sampler("models:/no-such-model@champion", tracking_uri=uri)
    with pytest.raises(ValueError, match="sampler.json"):
        load_sampler(f"file://{tmp_path}")


class _tracking_env:
    def __init__(self, uri):
        self.uri = uri

    def __enter__(self):
        import mlflow

        self.prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def __exit__(self, *exc):
        import mlflow

        mlflow.set_tracking_uri(self.prev[0])
        mlflow.set_registry_uri(self.prev[1])


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    from flows.registry import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="tracking-uri"):
        resolve_tracking_uri()
    db = tmp_path / "amed-runs" / "quickstart" / "mlflow.db"
    db.parent.mkdir(parents=True)
    db.touch()
    assert resolve_tracking_uri() == f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    cfg = _config("qs", "sqlite:///cfg.db")
    assert resolve_tracking_uri(config=cfg) == "sqlite:///cfg.db"


def test_endpoint_precedence_and_preflight(tmp_path, monkeypatch):
    """flag > sweep field > MLFLOW_TRACKING_URI / AMED_STORE_URL > embedded default; check_registry before compute."""
    import socket
    import time

    from flows.registry.tracking import RegistryUnreachable, check_registry, resolve_endpoints

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:1")
    monkeypatch.setenv("AMED_STORE_URL", "s3://env/store")
    bare = _config("qs", None)
    assert resolve_endpoints(bare, default_tracking="sqlite:///d.db", default_store="/d") == \
        {"mlflow_tracking_uri": "http://env:1", "store_url": "s3://env/store"}
    swept = bare.model_copy(update={"mlflow_tracking_uri": "http://sweep:1", "store_url": "/sweep"})
    assert resolve_endpoints(swept) == {"mlflow_tracking_uri": "http://sweep:1", "store_url": "/sweep"}
    assert resolve_endpoints(swept, tracking_uri="http://flag:1", store_url="/flag") == \
        {"mlflow_tracking_uri": "http://flag:1", "store_url": "/flag"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("AMED_STORE_URL")
    assert resolve_endpoints(bare, default_tracking="sqlite:///d.db", default_store="/d") == \
        {"mlflow_tracking_uri": "sqlite:///d.db", "store_url": "/d"}

    # preflight: a port nobody listens on fails fast with one line; a local SQLite folder passes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(RegistryUnreachable, match=rf"MLflow registry http://127.0.0.1:{port} cannot be reached") as e:
        check_registry(f"http://127.0.0.1:{port}", timeout=3)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 10
    with pytest.raises(RegistryUnreachable, match="u:\\*\\*\\*@"):  # never the password
        check_registry(f"http://u:secret@127.0.0.1:{port}", timeout=3)
    assert check_registry(f"sqlite:///{tmp_path}/sub/mlflow.db").startswith("local MLflow")
    # amed distill refuses before any compute (no Ray, no Prefect, nothing under --out but the folder)
    from flows.cli import main

    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["distill", "--out", str(out), "--tracking-uri", f"http://127.0.0.1:{port}"]) == 2
    assert time.perf_counter() - t0 < 30 and not (out / "store").exists() and not (out / "prefect").exists()


@pytest.mark.services
def test_registry_on_mlflow_server_with_s3_artifacts(tmp_path, teacher, mlflow_server, s3_server):
    import s3fs

    from flows.registry import fetch, register_sweep

    url, bucket = mlflow_server
    cfg = _config("server-sweep", url)
    cand = _candidate(tmp_path, teacher, solver="amed", seed=7, value=0.25)
    champs = register_sweep(cfg, [cand])
    assert champs == {"amed-digits-nfe3": "models:/amed-digits-nfe3@champion"}
    # the weights went to the S3-protocol server, through the tracking server's artifact proxy
    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": s3_server})
    stored = [p for p in fs.find(f"{bucket}/mlartifacts") if p.endswith("predictor.safetensors")]
    assert stored, "no predictor.safetensors under the server's s3 artifact destination"
    out = fetch("models:/amed-digits-nfe3@champion", tmp_path / "from-server", tracking_uri=url)
    assert torch.equal(_samples(load_local(out), teacher), _samples(load_local(cand.checkpoint_url), teacher))


def test_candidates_are_logged_in_parallel_against_a_server(tmp_path, teacher, mlflow_server, monkeypatch):
    """Against a tracking server, log_sweep logs and registers candidates on AMED_REGISTER_WORKERS threads (each its
    own active run); the record stays in candidate order, every child hangs under the sweep's run, each checkpoint is
    one version and the aliases end on the lowest values."""
    import mlflow

    from flows.registry import log_sweep
    from flows.registry.sweep import register_workers

    url, _ = mlflow_server
    monkeypatch.setenv("AMED_REGISTER_WORKERS", "3")
    assert register_workers(url, 5) == 3 and register_workers(f"sqlite:///{tmp_path / 'x.db'}", 5) == 1
    cfg = _config("parallel-sweep", url)
    cands = [_candidate(tmp_path, teacher, solver=s, seed=k, value=v) for k, (s, v) in
             enumerate([("amed", 0.5), ("amed+ipndm", 0.2), ("amed", 0.3), ("amed+ipndm", 0.4), ("amed", 0.6)])]
    res = log_sweep(cfg, cands)
    client = mlflow.MlflowClient(url, url)
    assert len(res.child_run_ids) == 5 and len(set(res.child_run_ids)) == 5
    for cand, rid, (name, version) in zip(cands, res.child_run_ids, res.versions):
        run = client.get_run(rid)
        assert run.data.tags["mlflow.parentRunId"] == res.parent_run_id and run.info.status == "FINISHED"
        assert (run.data.tags["amed.seed"], run.data.tags["amed.solver"]) == (str(cand.seed), cand.solver)
        assert client.get_model_version(name, version).tags["seed"] == str(cand.seed)
    name = cands[0].registered_name
    assert len({v for _, v in res.versions}) == 5
    every = client.search_model_versions(f"name = '{name}'")  # the module's server also holds an earlier test's
    assert float(client.get_model_version_by_alias(name, "champion").tags["value"]) == min(
        float(v.tags["value"]) for v in every) == 0.2
    assert float(client.get_model_version_by_alias(name, "best-amed").tags["value"]) == min(
        float(v.tags["value"]) for v in every if v.tags["solver"] == "amed")


def test_registration_checks_run_on_ray_without_the_teacher_in_this_process(tmp_path, teacher, monkeypatch):
    """From the flow, the teacher-dependent steps of registration (reference samples, schedule plot, the logged
    model's reproduction check) run as Ray tasks (flows.registry.checks.RayChecks): registering loads no model in
    the flow process; the versions and the champion are what the in-process path gives."""
    import mlflow
    import ray

    import amed_core.adapters
    import amed_core.denoisers
    import flows.registry.checks as checks
    from flows.config import ComputeConfig
    from flows.registry import log_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config("ray-checks", uri)
    cands = [_candidate(tmp_path, teacher, solver="amed", seed=k, value=v) for k, v in ((0, 0.5), (1, 0.3))]

    def trap(*a, **k):
        raise AssertionError("the flow process loaded a teacher")

    import flows.cluster.worker as worker

    worker._TEACHERS.clear()
    monkeypatch.setattr(amed_core.adapters, "load_teacher", trap)
    monkeypatch.setattr(amed_core.denoisers, "load_teacher", trap)
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        res = log_sweep(cfg, cands, checks=checks.RayChecks(ComputeConfig(cpus_per_task=1)))
    finally:
        ray.shutdown()
    assert not worker._TEACHERS  # the teacher was loaded (and cached) on the worker only
    client = mlflow.MlflowClient(uri, uri)
    assert len(res.versions) == 2
    name = cands[0].registered_name
    assert client.get_model_version_by_alias(name, "champion").tags["value"] == "0.3"
    arts = {f.path for f in client.list_artifacts(res.child_run_ids[0], "plots")}
    assert "plots/schedule.png" in arts  # made on a worker, logged here
