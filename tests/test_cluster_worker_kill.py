"""Kill the Prefect worker mid-flow (issue 13, item 3): a deployment run served by a process worker against a real
Prefect server is SIGKILLed (the worker, its flow-run process and everything they started) once the teacher is stored
and a first checkpoint is committed; a rerun of the deployment on a new worker completes without redoing committed
work: the teacher shards and committed checkpoints are neither regenerated nor rewritten (same bytes, same mtimes),
and every predictor is there once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from fixtures_prefect import deploy_local, prefect_cli, prefect_server, process_tree, start_worker, stop  # noqa: F401
from flows.storage import RunStore

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _committed(store: RunStore) -> dict[str, tuple[int, bytes]]:
    out = {}
    if not store.exists("checkpoints"):
        return out
    for name in store.list("checkpoints"):
        key = f"checkpoints/{name}/predictor.safetensors"
        if store.exists(f"checkpoints/{name}/train.json") and store.exists(key):
            out[name] = (os.stat(store.path(key)).st_mtime_ns, store.get(key))
    return out


def test_killed_worker_then_rerun_redoes_nothing_committed(prefect_server, tmp_path):  # noqa: F811
    env = prefect_server
    deploy_local(env)
    store_url = str(tmp_path / "store")
    sweep = {"name": "killed", "datasets": [{"name": "digits", "teacher": "digits-gmm"}],
             "solvers": ["amed", "amed+ipndm"], "nfes": [3, 5], "teacher": {"num_trajectories": 512, "shard_size": 128},
             "train": {"batch_size": 64, "epochs": 6}, "evaluation": {"num_samples": 256, "batch_size": 256},
             "panel": {"entries": [{"solver": "ipndm"}], "expand": [], "rank_samples": 0}, "init": {"mode": "recipe"},
             "register_models": False, "store_url": store_url,
             "compute": {"num_cpus": 2, "object_store_memory": 200_000_000, "max_parallel": 1}}
    store = RunStore(store_url)
    log = tmp_path / "worker.log"

    worker = start_worker(env, log)
    killed_at: dict = {}
    try:
        r = prefect_cli(env, "deployment", "run", "distill/local", "--params", json.dumps({"sweep": sweep}))
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = _committed(store)
            if done:
                pids = process_tree(worker.pid)
                for p in pids:          # the worker, its flow-run process, the local Ray it started: all at once
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed_at = {"committed": done, "pids": pids}
                break
            time.sleep(0.2)
    finally:
        stop(worker)
    assert killed_at, "no checkpoint was committed within 300 s\n" + log.read_text()[-4000:]
    assert len(killed_at["committed"]) < 4, "the run finished before the worker was killed"
    time.sleep(1)
    left = [p for p in killed_at["pids"] if Path(f"/proc/{p}").exists()
            and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not left, left
    shards_before = {p.name: p.stat().st_mtime_ns for p in Path(store_url, "teachers").rglob("shard-*.safetensors")}
    assert len(shards_before) == 4

    worker = start_worker(env, log)
    try:
        r = prefect_cli(env, "deployment", "run", "distill/local", "--params", json.dumps({"sweep": sweep}), "--watch",
                     "--watch-timeout", "400", timeout=430)
    finally:
        stop(worker)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Completed" in out, out + "\n--- worker ---\n" + log.read_text()[-4000:]
    after = _committed(store)
    assert len(after) == 4
    for name, (mtime, data) in killed_at["committed"].items():   # committed before the kill: not trained again
        assert after[name] == (mtime, data), name
    shards_after = {p.name: p.stat().st_mtime_ns for p in Path(store_url, "teachers").rglob("shard-*.safetensors")}
    assert shards_after == shards_before                          # the teacher was not generated again
    results = store.get_json("runs/killed/results.json")["results"]
    keys = [(x["family"], x["solver"], x["nfe"], x["seed"]) for x in results]
    assert len(keys) == len(set(keys)) and sum(x["family"] == "amed" for x in results) == 4
