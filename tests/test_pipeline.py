"""The distill flow under Prefect's test harness on a local Ray (2 CPUs): results, rerun, dead worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import safetensors.torch
import torch

from fixtures_prefect import prefect_harness, ray_local  # noqa: F401  (fixtures)
from flows.cluster.schedule import PREFETCHED
from flows.config import load_sweep
from flows.results import CandidateResult
from flows.storage import RunStore

pytestmark = pytest.mark.services

TINY = {
    "name": "tiny",
    "datasets": [{"name": "digits", "teacher": "digits-gmm"}],
    "solvers": ["amed", "amed+ipndm"],
    "nfes": [3],
    "teacher": {"num_trajectories": 512, "shard_size": 128},
    "train": {"batch_size": 64, "epochs": 2},
    "evaluation": {"num_samples": 512, "batch_size": 512, "grid_samples": 16},
    "register_models": False,
    "compute": {"max_parallel": 2, "teacher_actors": 2, "task_retries": 2},
    # the mechanics under test need the recipe's students and the 5-entry panel (issue 21 made both opt-in)
    "init": {"mode": "recipe"}, "panel": {"expand": [], "rank_samples": 0},
}


def _sweep(tmp_path, **over):
    return load_sweep({**TINY, "store_url": str(tmp_path / "store"), **over})


def _results(store_url: str) -> list[CandidateResult]:
    data = json.loads(RunStore(store_url).get("runs/tiny/results.json"))
    return [CandidateResult.model_validate(r) for r in data["results"]]


def _checkpoints(store_url: str) -> dict[str, tuple[float, bytes]]:
    store = RunStore(store_url)
    out = {}
    for name in store.list("checkpoints"):
        if not store.exists(f"checkpoints/{name}/predictor.safetensors"):
            continue  # a training-free panel entry's sampler.json (family free)
        p = store.path(f"checkpoints/{name}/predictor.safetensors")
        out[name] = (store.fs.modified(p).timestamp(), store.get(f"checkpoints/{name}/predictor.safetensors"))
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_harness, ray_local):  # noqa: F811
    from flows.distill import distill

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = _sweep(tmp)
    return cfg, distill(cfg.model_dump(mode="json"))  # a dict, as a deployment passes it


def test_distill_results_store_and_artifacts(first_run):
    cfg, out = first_run
    # 2 candidates + the panel at NFE 3: its 5 default entries, two of them the candidates' base solvers
    assert out["work"] == {"teacher_shards_written": 4, "trained": 2, "evaluated": 7}
    everything = _results(cfg.store_url)
    res = [r for r in everything if r.family == "amed"]
    assert [(r.solver, r.base_solver, r.nfe) for r in res] == [("amed", "heun", 3), ("amed+ipndm", "ipndm", 3)]
    (free,) = [r for r in everything if r.family == "free"]  # the panel's winner is a candidate (no weights)
    assert free.value == free.panel_value == min(r.panel_value for r in res)
    assert os.listdir(free.checkpoint_url) == ["sampler.json"]
    for r in res:
        assert r.value > 0 and r.base_value > 0 and r.protocol.metric == "fd_exact" and r.protocol.num_samples == 512
        assert os.path.isfile(os.path.join(r.checkpoint_url, "sampler.json"))
        assert os.path.isfile(r.artifacts["samples.png"]) and open(r.artifacts["samples.png"], "rb").read(4) == b"\x89PNG"
        assert len(r.loss_history) == 2 * 512 // 64 and r.sampler_spec["solver"] == r.solver
    # AMED-Solver at NFE 3 beats Heun at NFE 3 by far on the digits mixture (the paper's headline effect)
    assert res[0].value < 0.1 * res[0].base_value
    # the teacher store is complete and verifies
    from flows.storage import TeacherStore

    ts = TeacherStore(cfg.store_url)
    (h,) = ts.list_specs()
    assert ts.verify(h).passed
    # the table artifact and the sample grids are in Prefect
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts()}
    table = json.loads(arts["tiny-results"].data)
    assert [row["solver"] for row in table if row["family"] == "amed"] == ["amed", "amed+ipndm"] and "base" in table[0]
    assert all(row["panel"] == round(free.panel_value, 6) and row["panel_best"].startswith(free.solver) for row in table)
    # 2 candidates + 5 panel entries + the quality-vs-NFE plot
    assert arts["tiny-samples"].data.count("data:image/png;base64,") == 8


def test_rerun_does_no_teacher_or_training_work(first_run):
    from flows.distill import distill

    cfg, out = first_run
    before = _checkpoints(cfg.store_url)
    teacher_files = sorted(RunStore(cfg.store_url).fs.find(cfg.store_url + "/teachers"))
    again = distill(cfg)
    assert again["work"] == {"teacher_shards_written": 0, "trained": 0, "evaluated": 0}
    assert again["compute_spans"] == []
    assert _checkpoints(cfg.store_url) == before  # same bytes, same modification times
    assert sorted(RunStore(cfg.store_url).fs.find(cfg.store_url + "/teachers")) == teacher_files
    assert [r["value"] for r in again["results"]] == [r["value"] for r in out["results"]]
    teacher_nfe = [r["teacher_nfe"] for r in again["results"]]
    assert teacher_nfe == [r["teacher_nfe"] for r in out["results"]] and teacher_nfe[0] > 512  # whole teacher


def test_killed_training_worker_is_retried_with_identical_results(first_run, tmp_path):
    """SIGKILL the Ray worker of a running training task: Ray re-runs it, the flow completes, and the
    predictor is bit-identical to the undisturbed run (training is deterministic; nothing partial is read)."""
    from flows.distill import distill

    cfg0, out0 = first_run
    cfg = _sweep(tmp_path)
    store = RunStore(cfg.store_url)
    from flows.storage.barriers import Hold

    killed: list[dict] = []
    stop = threading.Event()

    def killer(hold: Hold):  # the first training waits after its first step until it is killed (no race)
        try:
            p = hold.wait_reached(timeout=600, alive=lambda: not stop.is_set())
            os.kill(p["pid"], signal.SIGKILL)
            killed.append(p)
        finally:
            hold.release()

    with Hold(cfg.store_url, "train-step", match={"attempt": 1}) as hold:
        t = threading.Thread(target=killer, args=(hold,), daemon=True)
        t.start()
        try:
            out = distill(cfg)
        finally:
            stop.set()
            t.join(5)
    assert killed, "no training reached the barrier"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0]["pid"], 0)
    final = store.get_json(f"progress/{killed[0]['job']}.json")
    assert final["done"] and final["attempt"] >= 2 and final["pid"] != killed[0]["pid"]
    assert out["work"]["trained"] == 2
    got, ref = _checkpoints(cfg.store_url), _checkpoints(cfg0.store_url)
    assert sorted(got) == sorted(ref)
    for k in ref:  # bit-identical predictor tensors (safetensors' metadata order varies, so not the raw bytes)
        a, b = safetensors.torch.load(got[k][1]), safetensors.torch.load(ref[k][1])
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["value"] for r in out["results"]] == [r["value"] for r in out0["results"]]


def test_prefetched_teacher_is_this_runs_work_even_when_a_cache_record_matches(tmp_path, prefect_harness, ray_local):  # noqa: F811
    """`amed distill` starts the teacher on Ray before the flow; when those shards are all committed by the time the
    flow's teacher task starts, Prefect used to find an earlier run's cache record for the same spec and shard hashes
    (another store, same content) and serve it: the task came back Cached, the summary said 0 shards written and the
    prefetched work was never taken (fresh-clone CI failed on this race once). Deterministic here: the prefetch is
    waited for before each flow starts, and the second store repeats the first one's spec."""
    from amed_core.teacher import TeacherSpec
    from flows.distill import distill
    from flows.plan import plan_sweep
    from flows.storage.teachers import TeacherStore

    small = {"teacher": {"num_trajectories": 384, "shard_size": 128},  # a spec no other test uses
             "evaluation": {"num_samples": 128, "batch_size": 128, "grid_samples": 0}, "solvers": ["amed"],
             "compute": {**TINY["compute"], "teacher_actors": 3}}  # all 3 shards start at once (no queue)
    for name in ("a", "b"):
        cfg = _sweep(tmp_path / name, **small)
        plan = plan_sweep(cfg)
        try:
            assert PREFETCHED.start(plan, cfg.compute) > 0
            (t,) = plan.teachers
            store, spec = TeacherStore(cfg.store_url), TeacherSpec.from_json(t.spec_json)
            deadline = time.time() + 120
            while store.missing_shards(spec):
                assert time.time() < deadline, "the prefetched teacher did not finish"
                time.sleep(0.2)
            out = distill(cfg)
        finally:
            PREFETCHED.clear()
        assert out["work"]["teacher_shards_written"] == 3, name


def test_amed_distill_cli_prints_results_and_where_things_are(first_run, tmp_path, capsys, monkeypatch):
    """`amed distill SWEEP --out DIR` in-process (reusing this module's Ray and Prefect API). The command
    starts the teacher and base-solver work on Ray before the flow runs (prefetch); the flow must adopt
    that work, not redo it or mistake it for a finished earlier run."""
    import yaml

    from flows.cli import main

    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({**TINY, "teacher": {"num_trajectories": 256, "shard_size": 128},
                                     "evaluation": {"num_samples": 256, "batch_size": 256, "grid_samples": 0}}))
    monkeypatch.chdir(tmp_path)
    for key in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.setenv(key, "-")  # records the current state, so what the command sets is undone after
        monkeypatch.delenv(key)
    assert main(["distill", str(sweep), "--out", "out", "--summary-json", "s.json"]) == 0
    text = capsys.readouterr().out
    assert "improvement_%" in text and "amed+ipndm" in text and "heun" in text
    assert f"results       {tmp_path / 'out' / 'store'}/runs/tiny/results.json" in text
    assert "prefect server start --host 127.0.0.1" in text and "mlflow ui --backend-store-uri sqlite:///" in text
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["work"] == {"teacher_shards_written": 2, "trained": 2, "evaluated": 7}
    assert not PREFETCHED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.json", "tiny.yaml"]
    assert main(["distill", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


PANEL_START = {  # the defaults of issue 21: init panel, the panel expanded over schedules and ranked
    "name": "panel-start",
    "datasets": [{"name": "digits", "teacher": "digits-gmm", "model_id": "dps"}],
    "nfes": [3, 4],
    "teacher": {"M": 4, "num_trajectories": 512, "shard_size": 256},
    "train": {"batch_size": 64, "epochs": 2, "lr": 2e-3, "loss_weighting": "relative", "val_every": 2},
    "families": {"gits": {"solvers": ["ipndm"], "warmup": 64, "grid_points": 21}, "epd": {"solvers": ["epd+ipndm"], "epochs": 2}},
    "panel": {"rank_samples": 128, "finalists": 2},
    "evaluation": {"num_samples": 512, "batch_size": 512, "grid_samples": 0},
    "register_models": False,
    "compute": {"max_parallel": 2, "teacher_actors": 1, "torch_threads": 1},
}


def test_default_sweep_ranks_the_panel_and_starts_from_its_winner(tmp_path, prefect_harness, ray_local):  # noqa: F811
    from flows.distill import distill

    cfg = load_sweep({**PANEL_START, "store_url": str(tmp_path / "store")})
    assert cfg.init.mode == "panel" and cfg.panel.expand == ["ipndm", "deis", "dpmpp", "unipc"]
    out = distill(cfg.model_dump(mode="json"))
    store = RunStore(cfg.store_url)
    doc = json.loads(store.get("runs/panel-start/results.json"))
    results = [CandidateResult.model_validate(r) for r in doc["results"]]
    for p in doc["panels"]:
        ranked = [e for e in p["entries"] if e.get("rank_value") is not None]
        full = [e for e in p["entries"] if e["value"] is not None]
        assert len(ranked) == len(p["entries"]) > 30 and p["entries"][0]["rank_samples"] == 128
        assert 2 <= len(full) <= 3 and p["best"]["id"] in {e["id"] for e in full}  # finalists (+ a base solver)
        winner = min(ranked, key=lambda e: e["rank_value"])
        trained = [r for r in results if r.nfe == p["nfe"] and r.family != "free"]
        assert {r.family for r in trained} == {"amed", "gits", "epd"}
        for r in trained:  # every family started from the ranking's winner and is compared with it
            assert r.base_solver == winner["solver"]
            if r.family == "gits":
                continue
            assert r.training["init"]["winner"] == winner["id"]
            v = r.training["validation"]
            assert v["best"] <= v["first"] and r.training["held_out"] == 64  # never worse on held-out trajectories
        amed = next(r for r in trained if r.family == "amed")
        assert amed.solver == {"ipndm": "amed+ipndm", "deis": "amed+deis", "dpmpp": "amed+dpmpp",
                               "unipc": "amed+unipc"}[winner["solver"]]
        assert amed.training["init"]["exact"] and amed.sampler_spec["sigmas"]
        if p["nfe"] == 3 and not winner["options"].get("afs"):  # odd NFE, no AFS: one single-evaluation step
            assert amed.sampler_spec["single_steps"] == [0]
    assert out["work"]["trained"] == 6 and all(r.status in ("ok", "at start", "stopped early") for r in results)
