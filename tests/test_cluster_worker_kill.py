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

    from flows.storage.barriers import Hold

    worker = start_worker(env, log)
    killed_at: dict = {}
    # The kill lands by barrier (issue 20): the first training commits, the second waits after its first step until
    # the worker tree is gone (max_parallel 1: one job at a time), so exactly one checkpoint is committed at the kill.
    with Hold(store_url, "train-step", match={"attempt": 1}, skip=1) as hold:
        try:
            r = prefect_cli(env, "deployment", "run", "distill/local", "--params", json.dumps({"sweep": sweep}))
            assert r.returncode == 0, r.stdout + r.stderr
            hold.wait_reached(timeout=300, alive=lambda: worker.poll() is None)
            done = _committed(store)
            pids = process_tree(worker.pid)
            for p in pids:          # the worker, its flow-run process, the local Ray it started: all at once
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed_at = {"committed": done, "pids": pids}
        finally:
            stop(worker)
    assert len(killed_at["committed"]) == 1, log.read_text()[-4000:]
    def alive(p: int) -> bool:
        try:
            return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 30  # SIGKILLed processes are gone once the kernel has torn them down: wait for
    while (left := [p for p in killed_at["pids"] if alive(p)]) and time.monotonic() < deadline:  # that, not 1 s
        time.sleep(0.1)
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
