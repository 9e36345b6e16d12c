"""End to end through a real Prefect server: deploy infra/prefect.yaml, start a process worker, run the
deployment with a small sweep, wait for Completed, check the store's outputs."""

from __future__ import annotations

import json

import pytest
import yaml

from fixtures_prefect import ROOT, deploy_local, prefect_cli, prefect_server, start_worker, stop  # noqa: F401
from flows.config import load_sweep
from flows.storage import RunStore
from flows.results import CandidateResult

pytestmark = pytest.mark.services


def test_prefect_yaml_parameters_are_valid_sweeps():
    doc = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    names = {d["name"]: d for d in doc["deployments"]}
    assert set(names) == {"local", "kubernetes"}
    assert names["local"]["work_pool"]["name"] == "amed-local"
    for d in names.values():
        assert d["entrypoint"] == "flows.distill.distill"
        sweep = d["parameters"]["sweep"]
        load_sweep(str(ROOT / sweep) if isinstance(sweep, str) else sweep)
    env = names["kubernetes"]["work_pool"]["job_variables"]["env"]
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_ADDRESS"].startswith("ray://")


def test_deploy_worker_run_completed(prefect_server, tmp_path):  # noqa: F811
    env = prefect_server
    deploy_local(env)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    store_url = str(tmp_path / "store")
    sweep = {"name": "deployed", "datasets": [{"name": "digits", "teacher": "digits-gmm"}], "solvers": ["amed"],
             "nfes": [3], "teacher": {"num_trajectories": 256, "shard_size": 128}, "train": {"batch_size": 64},
             "evaluation": {"num_samples": 256, "batch_size": 256, "grid_samples": 16}, "register_models": False,
             "store_url": store_url, "compute": {"num_cpus": 2, "object_store_memory": 200_000_000},
             "init": {"mode": "recipe"}, "panel": {"expand": [], "rank_samples": 0}}
    try:
        r = prefect_cli(env, "deployment", "run", "distill/local", "--params", json.dumps({"sweep": sweep}), "--watch",
                     "--watch-timeout", "300", timeout=330)
    finally:
        stop(worker)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Completed" in out, out + "\n--- worker ---\n" + log.read_text()[-4000:]

    store = RunStore(store_url)
    data = store.get_json("runs/deployed/results.json")
    results = [CandidateResult.model_validate(x) for x in data["results"]]
    (res,) = [r for r in results if r.family == "amed"]  # beside it: the training-free panel's winner (family free)
    assert {r.family for r in results} == {"amed", "free"}
    assert (res.solver, res.base_solver, res.nfe) == ("amed", "heun", 3)
    assert 0 < res.value < 0.1 * res.base_value
    assert store.exists(res.checkpoint_url.removeprefix(store.root + "/") + "/train.json")
    assert data["config"]["store_url"] == store_url


def test_cluster_definitions_parse_and_ask_for_gpus():
    docs = {p.relative_to(ROOT / "infra").as_posix(): list(yaml.safe_load_all(p.read_text()))
            for p in (ROOT / "infra").rglob("*.yaml")}
    (rc,) = docs["ray/raycluster.yaml"]
    assert rc["kind"] == "RayCluster" and rc["spec"]["rayVersion"] == "2.60.0"
    gpu = rc["spec"]["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert docs["ray/cluster.yaml"][0]["available_node_types"]["gpu_worker"]["resources"] == {"GPU": 1}
    kinds = [d["kind"] for d in docs["k8s/prefect-worker.yaml"]]
    assert "Deployment" in kinds and "Role" in kinds
    for script in ("start-prefect-server.sh", "start-mlflow-server.sh"):
        text = (ROOT / "infra" / script).read_text()
        assert "--host 127.0.0.1" in text and "0.0.0.0" not in text
