"""The users' path (issue 19), its fast checks: one name for a baseline everywhere (item 6), the registry lookups of
`amed fetch` (its summary), the smaller defects of item 8 (a training-free checkpoint's model, the panel without base
solvers, the CLI's help and `amed sample --tracking-uri`), and a bring-your-own-model teacher that fails before any
work (item 3). The slow ends of the path are in test_readme.py, test_ui.py, test_interrupt.py and test_local_stack.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amed_core.denoisers import load_teacher
from amed_core.schedules import ScheduleSpec
from flows.config import load_sweep
from flows.results import CandidateResult, EvalProtocol, champion_rows, results_table

ROOT = Path(__file__).resolve().parents[1]
PROTO = EvalProtocol(metric="fd_exact", num_samples=64, seed=1000, reference="digits-gmm")
SMALL = {"name": "small", "datasets": [{"name": "digits", "teacher": "digits-gmm", "model_id": "digits"}],
         "solvers": ["amed+ipndm"], "nfes": [3], "teacher": {"num_trajectories": 256, "shard_size": 256},
         "init": {"mode": "recipe"}}  # the candidates this file names (21b's default, panel, starts from the panel)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


# ---------------------------------------------------------------------------------------------------------------
# Item 6: one name for a baseline, with its options, everywhere.

def test_baseline_name_shows_schedule_and_options():
    from amed_core.evaluate import base_options, baseline_name

    assert baseline_name("ipndm", {"afs": True, "max_order": 4}, "polynomial", 7.0) == "ipndm[poly7,afs=True,max_order=4]"
    spec = ScheduleSpec("time_uniform", rho=2.0, sigma_min=0.002, sigma_max=80.0)
    assert baseline_name("deis", {"afs": False, "deis_mode": "tab"}, spec) == "deis[time_uniform2,afs=False,deis_mode=tab]"
    assert baseline_name("dpmpp", {"afs": False, "predict_x0": None}, spec.to_dict() | {"schedule_type": "logsnr"}) \
        == "dpmpp[logsnr,afs=False]"
    assert baseline_name("heun") == "heun"
    # the base solver of a student: its AFS, its order capped at the base's highest
    assert base_options("ipndm", afs=True, max_order=4) == {"afs": True, "max_order": 4}
    assert base_options("dpmpp", afs=False, max_order=5, predict_x0=True, lower_order_final=True) == \
        {"afs": False, "max_order": 3, "predict_x0": True, "lower_order_final": True}
    assert base_options("heun", afs=True, max_order=4) == {"afs": True}


def _result(**kw) -> CandidateResult:
    base = dict(dataset="digits", solver="amed+ipndm", base_solver="ipndm", nfe=3, seed=0, checkpoint_url="/x",
                protocol=PROTO, value=0.1, base_value=5.163, teacher_id="digits",
                base_options={"schedule": "polynomial", "rho": 7.0, "options": {"afs": True, "max_order": 4}},
                panel_best={"solver": "ipndm", "schedule": "polynomial", "rho": 7.0,
                            "options": {"afs": False, "max_order": 4}, "value": 1.391},
                panel_value=1.391)
    return CandidateResult(**{**base, **kw})


def test_results_table_names_base_and_panel_with_their_options():
    """The issue's champion: the table said "ipndm" for both its base (AFS on) and the panel's best (AFS off)."""
    rows = results_table([_result()])
    assert rows[0]["base_solver"] == "ipndm[poly7,afs=True,max_order=4]"
    assert rows[0]["panel_best"] == "ipndm[poly7,afs=False,max_order=4]" and rows[0]["margin"] == round(0.1 / 1.391, 3)
    assert champion_rows([_result()])[0]["panel_best"] == "ipndm[poly7,afs=False,max_order=4]"
    # a result without a base score (panel.include_base_solvers: false) says so instead of a number
    row = results_table([_result(base_value=None, base_options={})])[0]
    assert row["base_solver"] == "ipndm (not evaluated)" and row["base"] == "-" and row["improvement_%"] == "-"


def test_sample_predictor_scores_the_sweeps_base_under_the_same_name(teacher):
    """`amed sample --predictor` and the sweep compare a checkpoint with the same base solver (the student's schedule,
    AFS and order) and name it the same way; it used its own default schedule and options, named "ipndm (afs)"."""
    from amed_core.amed import AMEDPredictor, SamplerSpec, compare_with_base
    from amed_core.amed.checkpoint import Sampler
    from flows.plan.sweep import _base_options
    from flows.results import entry_name

    spec = SamplerSpec.create("amed+ipndm", nfe=3, afs=True, denoiser=teacher)
    rows, _ = compare_with_base(Sampler(spec, AMEDPredictor(spec.predictor, seed=0)), teacher, n=64, seed=0,
                                rmse_samples=8, reference_steps=20)
    in_sweep = entry_name({"solver": "ipndm", "schedule": spec.schedule.schedule_type, "rho": spec.schedule.rho,
                           "options": _base_options("ipndm", spec)})
    assert rows[1].name == in_sweep == "ipndm[poly7,afs=True,max_order=4]"


def _registry_with_champion(tmp_path: Path, teacher) -> str:
    """A SQLite registry holding amed-digits-nfe3 v1 @champion with the version tags the register stage writes
    (flows.registry.registration: base_* for the base solver, baseline_* for the panel's best, margin)."""
    import mlflow

    from amed_core.amed import AMEDPredictor, SamplerSpec, save_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = SamplerSpec.create("amed+ipndm", 3, afs=True, denoiser=teacher)
    ckpt = save_checkpoint(tmp_path / "ckpt", AMEDPredictor(spec.predictor, seed=0), spec)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(ckpt), "sampler/checkpoint")
    client.create_registered_model("amed-digits-nfe3")
    tags = {"solver": "amed+ipndm", "family": "amed", "metric": "fd_exact", "value": "0.1", "base_solver": "ipndm",
            "base_value": "5.163",
            "base_options": json.dumps({"schedule": "polynomial", "rho": 7.0, "options": {"afs": True, "max_order": 4}}),
            "baseline_solver": "ipndm", "baseline_value": "1.391", "margin": repr(0.1 / 1.391),
            "baseline_options": json.dumps({"schedule": "polynomial", "rho": 7.0, "afs": False, "max_order": 4})}
    mv = client.create_model_version("amed-digits-nfe3", f"{run.info.artifact_uri}/sampler/checkpoint",
                                     run.info.run_id, tags=tags)
    client.set_registered_model_alias("amed-digits-nfe3", "champion", mv.version)
    return uri


def test_fetch_summary_compares_with_the_panels_best_by_name(tmp_path, teacher):
    from flows.registry.loading import describe, summary_lines

    uri = _registry_with_champion(tmp_path, teacher)
    files = {"sampler.json": (tmp_path / "ckpt" / "sampler.json").read_bytes()}
    lines = summary_lines(describe("models:/amed-digits-nfe3@champion", files, tracking_uri=uri), tmp_path / "out")
    text = "\n".join(lines)
    assert "model    amed-digits-nfe3 version 1 (fetched as @champion; aliases: champion)" in text, text
    assert "metric   fd_exact 0.1 (lower is better)" in text, text
    assert f"panel    best training-free ipndm[poly7,afs=False,max_order=4] 1.391; margin {0.1 / 1.391:.3g}" in text
    assert "base     ipndm[poly7,afs=True,max_order=4] 5.163 (the base solver at the same NFE)" in text, text


def test_amed_fetch_reads_its_summary_from_the_registry_it_fetched_from(tmp_path, teacher):
    """In a folder where `amed distill` ran (no MLFLOW_TRACKING_URI), `amed fetch` printed "version None ... aliases:
    none" and created ./mlflow.db: restoring MLflow's URI after the download left MLflow's default in the environment,
    and the summary's lookup read that empty database."""
    db = tmp_path / "amed-runs" / "quickstart"
    db.mkdir(parents=True)
    _registry_with_champion(db, teacher)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "fetch", "models:/amed-digits-nfe3@champion", "--out", "got"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "amed-digits-nfe3 version 1 (fetched as @champion; aliases: champion)" in r.stdout, r.stdout
    assert "panel    best training-free ipndm[poly7,afs=False,max_order=4]" in r.stdout, r.stdout
    assert not (tmp_path / "mlflow.db").exists()  # nothing written outside what the user asked for


def test_tracking_block_restores_the_environment(tmp_path):
    from flows.registry.tracking import tracking

    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # earlier tests of this process may have set them
        os.environ.pop(k, None)
    with tracking(f"sqlite:///{tmp_path / 'a.db'}"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


# ---------------------------------------------------------------------------------------------------------------
# Item 8: the smaller defects.

def test_training_free_checkpoints_record_their_model():
    """A training-free champion's sampler.json named no model ({}): `amed fetch` printed "teacher unknown" although
    its sigmas are the model's. Every baseline job of a plan now carries the teacher's identity."""
    from flows.plan import plan_sweep

    plan = plan_sweep(load_sweep(SMALL))
    assert plan.baselines
    for b in plan.baselines:
        assert b.teacher_identity.get("name") == "digits-gmm" and b.teacher_identity.get("content_sha256"), b.id


def test_panel_without_base_solvers_evaluates_no_base_solver():
    """`panel.include_base_solvers: false` still evaluated each candidate's base solver (iPNDM with AFS here)."""
    from flows.plan import plan_sweep

    cfg = load_sweep({**SMALL, "panel": {"entries": [{"solver": "deis"}], "expand": [],
                                            "include_base_solvers": False}})
    plan = plan_sweep(cfg)
    assert [b.solver for b in plan.baselines] == ["deis"]
    assert all(c.base_id == "" and c.base_solver == "ipndm" for c in plan.candidates if c.family == "amed")
    with_base = plan_sweep(load_sweep({**SMALL, "panel": {"entries": [{"solver": "deis"}], "expand": []}}))
    assert sorted(b.solver for b in with_base.baselines) == ["deis", "ipndm"]


def test_cli_help_names_every_mode_and_sample_takes_a_tracking_uri(tmp_path):
    from flows.cli import build_parser

    top = build_parser().format_help()
    assert "--predictor" in top and "--panel" in top  # `amed sample` is not only training-free
    r = subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--predictor", "models:/nope@champion",
                        "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and f"on sqlite:///{tmp_path / 'empty.db'}" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--tracking-uri", "sqlite:///x.db"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "use it with --predictor" in r.stderr and len(r.stderr.strip().splitlines()) == 1
