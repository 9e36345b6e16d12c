"""GS in a sweep (`amed distill`, Prefect's test harness, a local Ray, MLflow on SQLite; no mocks): `families: gs`
plans an endpoint-only teacher and one candidate per initialisation, the panel-initialised one waits for the panel and
starts from the best schedule GS can express, GS wins the champion alias of its (teacher, NFE), and the champion
fetches (`amed fetch`), samples (`amed sample --predictor`) and predicts through the registered pyfunc identically."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures_prefect import prefect_harness, ray_local  # noqa: F401  (fixtures)
from flows.config import load_sweep
from flows.plan import plan_sweep

pytestmark = pytest.mark.services

# AMED trains on 64 trajectories (one update per step, the recipe's random start) against a panel of Euler and GS's own
# base (DPM-Solver++(3M) on a VP-uniform grid; not expanded); GS trains 200 iterations on 192 pairs. At NFE 4 on
# digits-gmm the GS candidates win.
SWEEP = {
    "name": "gswin",
    "datasets": [{"name": "digits", "teacher": "digits-gmm", "model_id": "digits"}],
    "solvers": ["amed"],
    "nfes": [4],
    "teacher": {"num_trajectories": 64, "shard_size": 64},
    "train": {"batch_size": 64},
    "evaluation": {"num_samples": 256, "batch_size": 256, "grid_samples": 0},
    "panel": {"entries": [{"solver": "euler"}], "include_base_solvers": False, "expand": []},
    "init": {"mode": "recipe"},  # the mechanics of a GS win; the expanded panel vs GS: BENCHMARKS.md "GS"
    "families": {"gs": {"inits": ["reference", "panel"], "iterations": 200, "eval_every": 50, "train_size": 192,
                        "val_size": 64, "teacher_steps": 32}},
    "compute": {"max_parallel": 2, "teacher_actors": 1},
}


def test_plan_gs_teacher_candidates_and_panel_wait(tmp_path):
    cfg = load_sweep({**SWEEP, "store_url": str(tmp_path / "store")})
    plan = plan_sweep(cfg)
    (gst,) = [t for t in plan.teachers if t.role == "gs"]
    spec = json.loads(gst.spec_json)
    assert gst.num_trajectories == 256 and spec["sub_steps"] == 31 and [g["num_steps"] for g in spec["grids"]] == [2]
    gs = {c.train.fit["init"]: c for c in plan.candidates if c.family == "gs"}
    assert set(gs) == {"reference", "panel"} and all(c.train.teacher_hash == gst.spec_hash for c in gs.values())
    slot = plan.panel_for("digits", 4)
    assert [e["id"] for e in gs["panel"].train.fit["panel"]] == slot.entries and gs["reference"].train.fit["panel"] == []
    base = next(b for b in plan.baselines if b.id == gs["reference"].base_id)
    assert (base.solver, base.schedule["schedule_type"], base.solver_options["lower_order_final"]) == ("dpmpp", "time_uniform", False)
    with pytest.raises(ValueError, match="families.gs: .*batch_size \\(24\\) must not exceed train_size \\(8\\)"):
        load_sweep({**SWEEP, "families": {"gs": {"inits": ["reference"], "train_size": 8}}})


def test_panel_init_takes_the_best_entry_gs_can_express(tmp_path):
    """Ranked by score (ties: plan order); an entry GS cannot express (an AFS grid: N + 2 points) is skipped; with none
    left GS starts from the reference's grid and records why."""
    from amed_core.families.gs import config_for
    from amed_core.adapters import load_teacher
    from flows.cluster.jobs import gs_panel_init
    from flows.storage import RunStore

    store = RunStore(str(tmp_path / "store"))
    poly = {"schedule_type": "polynomial", "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0}
    entries = [{"id": "a", "result_key": "evals/a.json", "solver": "ipndm", "schedule": poly, "num_steps": 6,
                "options": {"afs": True}},
               {"id": "b", "result_key": "evals/b.json", "solver": "deis", "schedule": poly, "num_steps": 5,
                "options": {"afs": False}},
               {"id": "c", "result_key": "evals/c.json", "solver": "dpmpp", "schedule": {**poly, "schedule_type": "logsnr"},
                "num_steps": 5, "options": {"afs": False}}]
    for key, value in (("a", 0.1), ("b", 0.3), ("c", 0.2)):
        store.put_json(f"evals/{key}.json", {"value": value})
    config = config_for(load_teacher("digits-gmm"), 4)
    sigmas, source = gs_panel_init(store, config, entries)
    assert (source["id"], source["panel_rank"], source["value"]) == ("c", 1, 0.2) and len(sigmas) == 5
    start, why = gs_panel_init(store, config, entries[:1])
    assert start == "reference" and why["panel"] == "no entry GS can express" and "has 5 points" in why["tried"][0]


def test_gs_wins_the_champion_in_amed_distill(prefect_harness, ray_local, tmp_path, capsys, monkeypatch):  # noqa: F811
    import mlflow
    import pandas as pd
    import yaml

    from amed_core import families as F
    from amed_core.adapters import load_teacher
    from amed_core.teacher import trajectory_inputs
    from flows.cli import main
    from flows.registry.tracking import tracking
    from flows.storage import RunStore

    (tmp_path / "gs.yaml").write_text(yaml.safe_dump(SWEEP))
    monkeypatch.chdir(tmp_path)
    for key in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.setenv(key, "-")
        monkeypatch.delenv(key)
    assert main(["distill", "gs.yaml", "--out", "out", "--summary-json", "s.json"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((tmp_path / "s.json").read_text())
    res = {(r["family"], r["sampler_spec"].get("init")): r for r in summary["results"]}
    gs_ref, gs_panel, amed = res[("gs", "reference")], res[("gs", "panel")], res[("amed", None)]
    free = next(r for r in summary["results"] if r["family"] == "free")
    best = min(summary["results"], key=lambda r: r["value"])
    assert best["family"] == "gs", [(r["family"], r["value"]) for r in summary["results"]]
    assert gs_ref["value"] < gs_ref["base_value"] and best["value"] < min(amed["value"], free["value"])
    assert "gs (panel init)" in text and "gs (reference init)" in text
    # the champion alias of amed-digits-nfe4 is a GS version; its run has the schedule plot
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("amed-digits-nfe4", "champion")
    assert mv.tags["family"] == "gs" and mv.tags["method"] == "gs"
    assert "schedule.png" in [a.path.split("/")[-1] for a in client.list_artifacts(mv.run_id, "plots")]
    # the panel-initialised GS started from the best panel entry GS can express, recorded in its checkpoint
    store = RunStore(str(tmp_path / "out" / "store"))
    ckpt = F.sampler_from_files({n: store.get(f"{gs_panel['checkpoint_url'].split('/store/')[1]}/{n}")
                                 for n in F.checkpoint_names("gs")})
    init = ckpt.spec.init
    panel = {p["solver"]: p for p in next(p for p in summary["panels"] if p["nfe"] == 4)["entries"]}
    assert init["kind"] == "grid" and init["source"]["value"] == min(p["value"] for p in panel.values())
    assert init["source_sigmas"] == pytest.approx(panel[init["source"]["solver"]]["sigmas"], rel=1e-12)
    # fetch + sample + pyfunc: the same samples as the checkpoint the evaluate stage scored
    assert main(["fetch", "models:/amed-digits-nfe4@champion", "--out", "champ", "--tracking-uri", uri]) == 0
    fetched = F.load_sampler(tmp_path / "champ")
    assert F.describe(fetched)["family"] == "gs"
    teacher = load_teacher("digits-gmm")
    noise, _ = trajectory_inputs([1000000, 1000001], teacher.shape)
    x = fetched(teacher, noise.double()).x
    with tracking(uri):
        got = mlflow.pyfunc.load_model("models:/amed-digits-nfe4@champion").predict(pd.DataFrame({"seed": [1000000, 1000001]}))
    assert torch.equal(torch.as_tensor(got).reshape(x.shape), x)
    capsys.readouterr()
    assert main(["sample", "--predictor", str(tmp_path / "champ"), "--n", "128", "--out-dir", "eval"]) == 0
    assert "gs gs at NFE 4" in capsys.readouterr().out
