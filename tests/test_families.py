"""Method families (issue 12): checkpoints of every family round-trip (files and folders) and sample identically;
GITS fits from stored trajectories; the panel's best entry and the champion across families are chosen correctly;
``models:/...@champion`` of every family fetches and samples identically (real MLflow on SQLite, no mocks)."""

from __future__ import annotations

import math

import pytest
import torch

from amed_core import families as F
from amed_core.amed import AMEDPredictor, Sampler, SamplerSpec
from amed_core.denoisers import load_teacher
from amed_core.methods import get_method, method_names, nfe_for
from amed_core.methods.epd import EPDParams, EPDTrainConfig, epd_total_evals
from amed_core.schedules import ScheduleSpec
from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard, shard_to_batches, trajectory_inputs
from flows.results import CandidateResult, EvalProtocol

PROTO = EvalProtocol(metric="fd_exact", num_samples=64, seed=1000, reference="digits-gmm")


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


@pytest.fixture(scope="module")
def fine_shard(teacher):
    """64 stored trajectories on a 21-point polynomial grid (what the sweep's GITS teacher stores)."""
    sch = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
    spec = TeacherSpec.for_denoiser(teacher, [StudentGrid(sch, 21)], num_trajectories=64, shard_size=64, sub_steps=1,
                                    solver="heun")
    return generate_shard(teacher, spec, 0)


def _noise(teacher, n=8):
    noise, _ = trajectory_inputs(list(range(1000, 1000 + n)), teacher.shape)
    return noise


def _samplers(teacher, shard):
    free = F.free.make("ipndm", 5, denoiser=teacher)
    gits = F.gits.fit(teacher, shard.states, shard.sigmas, method="gits+ipndm", nfe=5, warmup=32)
    spec = SamplerSpec.create("amed+ipndm", 3, afs=True, denoiser=teacher)
    amed = Sampler(spec, AMEDPredictor(spec.predictor, seed=0))
    grid = spec.grid()
    doc = F.epd.spec_doc("epd+ipndm", 3, grid, afs=True, options={"max_order": 4, "batched": True}, num_points=2,
                         teacher=teacher.identity())
    epd = F.epd.EPDSampler(EPDParams(len(grid), 2, scale_dir=0.01, generator=torch.Generator().manual_seed(0)), doc)
    return {"free": free, "gits": gits, "amed": amed, "epd": epd}


def test_table_registers_gits_and_epd():
    assert set(method_names("gits")) >= {"gits+ipndm", "gits+dpmpp", "gits+deis"}
    assert method_names("epd") == ("epd", "epd+ipndm")
    assert get_method("gits+ipndm").base == "ipndm" and get_method("gits+ipndm").fn is get_method("ipndm").fn
    # EPD's NFE is the paper's parallel count 2 (N - 1) - afs; the calls a GPU pays are (N - 1)(K + 1) - afs
    assert nfe_for("epd", 4, afs=True) == 5 and epd_total_evals(4, 2, afs=True) == 8


def test_every_family_round_trips_and_samples_identically(teacher, fine_shard, tmp_path):
    noise = _noise(teacher)
    for name, s in _samplers(teacher, fine_shard).items():
        files = F.sampler_files(s)
        assert set(files) == set(F.checkpoint_names(name)) and F.checkpoint_kind(files["sampler.json"]) == name
        if name in ("free", "gits"):
            assert set(files) == {"sampler.json"}  # no weights: JSON only
        again = F.sampler_from_files(files)
        folder = F.load_sampler(F.save_sampler(tmp_path / name, s))
        x = s(teacher, noise).x
        assert torch.equal(again(teacher, noise).x, x) and torch.equal(folder(teacher, noise).x, x), name
        assert F.sampler_files(again) == files  # bytes are stable
        d = F.describe(again)
        assert d["family"] == name
        if name == "epd":
            assert d["nfe"] == 3 and d["denoiser_calls"] == epd_total_evals(d["num_steps"], 2, afs=True) == 5
        else:
            assert d["denoiser_calls"] == d["nfe"]


def test_gits_selects_from_the_stored_grid(teacher, fine_shard):
    s = F.gits.fit(teacher, fine_shard.states, fine_shard.sigmas, method="gits+ipndm", nfe=5, warmup=32)
    fine = [float(v) for v in fine_shard.sigmas]
    assert len(s.spec.sigmas) == 6 and all(v in fine for v in s.spec.sigmas)
    assert s.spec.sigmas[0] == fine[0] and s.spec.sigmas[-1] == fine[-1]
    assert s.spec.fit["dp_list"] == [fine.index(v) for v in s.spec.sigmas] and s.spec.fit["warmup_trajectories"] == 32
    assert s(teacher, _noise(teacher)).nfe == 5
    with pytest.raises(ValueError, match="teacher grid points"):
        F.gits.fit(teacher, fine_shard.states[:4], fine_shard.sigmas[:4], method="ipndm", nfe=5)


def test_epd_family_fits_from_teacher_batches(teacher, fine_shard):
    sch = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
    grid = sch.grid(21)  # the stored grid: every point of it is a student point here
    cfg = EPDTrainConfig(solver="epd", afs=False, num_trajectories=32)
    s, res = F.epd.fit(teacher, grid, shard_to_batches(fine_shard, grid, batch_size=16), cfg, nfe=40)
    assert res.updates == 2 * 20 and F.describe(s)["denoiser_calls"] == 20 * 3
    assert torch.equal(F.sampler_from_files(s.files())(teacher, _noise(teacher)).x, s(teacher, _noise(teacher)).x)


def _result(family, solver, value, nfe=5, panel=None):
    return CandidateResult(dataset="digits", solver=solver, base_solver="ipndm", nfe=nfe, seed=0, checkpoint_url="x",
                           protocol=PROTO, value=value, base_value=1.0, family=family, teacher_id="digits-abc",
                           panel_best=panel or {"solver": "deis", "value": 0.5}, panel_value=(panel or {"value": 0.5})["value"])


def test_panel_best_and_champion_across_families(tmp_path):
    from flows.config import load_sweep
    from flows.report import panel_summaries
    from flows.results import champion_rows, results_table
    from flows.plan import plan_sweep

    cfg = load_sweep({"name": "fam", "datasets": [{"name": "digits", "teacher": "digits-gmm", "model_id": "dg"}],
                      "solvers": ["amed"], "nfes": [3, 4], "store_url": str(tmp_path / "store"),
                      "families": {"gits": {"solvers": ["ipndm"]}}, "init": {"mode": "recipe"},
                      "panel": {"entries": [{"solver": "ipndm"}, {"solver": "heun"}, {"solver": "dpmpp"}], "expand": []}})
    plan = plan_sweep(cfg)
    slot3, slot4 = plan.panel_for("digits", 3), plan.panel_for("digits", 4)
    jobs = {b.id: b for b in plan.baselines}
    # heun at NFE 3 needs AFS (the entry, afs false, is skipped); amed's base heun (AFS) joins; at NFE 4 the entry
    # equals amed's base heun (no AFS, polynomial rho 7) and is evaluated once
    assert sorted(jobs[i].solver for i in slot3.entries) == ["dpmpp", "heun", "ipndm"]
    assert [jobs[i].solver_options["afs"] for i in slot3.entries if jobs[i].solver == "heun"] == [True]
    assert sorted(jobs[i].solver for i in slot4.entries) == ["dpmpp", "heun", "ipndm"]
    assert {c.family for c in plan.candidates} == {"amed", "gits"} and {t.role for t in plan.teachers} == {"students", "gits"}
    assert all(c.teacher_id == "dg" for c in plan.candidates)
    values = {i: v for i, v in zip(slot3.entries, [math.nan, 2.0, 1.5])}  # NaN never wins
    values.update({i: v for i, v in zip(slot4.entries, [0.9, 0.7, 0.7])})  # ties: the first in plan order
    scores = {i: {"value": v, "nfe": 3} for i, v in values.items()}
    p = panel_summaries(plan, scores)
    assert p[("digits", 3)]["best"]["value"] == 1.5 and p[("digits", 3)]["best"]["id"] == slot3.entries[2]
    assert p[("digits", 4)]["best"]["id"] == slot4.entries[1]

    rows = [_result("amed", "amed", 0.6), _result("gits", "gits+ipndm", 0.4), _result("free", "deis", 0.5),
            _result("amed", "amed", 0.05, nfe=3, panel={"solver": "ipndm", "value": 1.0})]
    best = champion_rows(rows)
    assert [(b["nfe"], b["best"], b["margin"]) for b in best] == [(3, "amed:amed", 0.05), (5, "gits:gits+ipndm", 0.8)]
    table = results_table(rows)
    assert table[1]["family"] == "gits" and table[1]["margin"] == 0.8 and table[1]["panel_best"].startswith("deis")
    assert CandidateResult(**{**rows[0].model_dump(), "teacher_id": "dg"}).registered_name == "amed-dg-nfe5"


def test_champion_of_every_family_fetches_and_samples_identically(tmp_path, teacher, fine_shard):
    """One registered model per (teacher, NFE); each family's candidate in turn is strictly better, so the
    champion alias moves to it; models:/NAME@champion then fetches a sampler giving the evaluated samples."""
    from flows.config import load_sweep
    from flows.registry import fetch, load_sampler, log_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_sweep({"name": "famreg", "datasets": [{"name": "digits", "teacher": "digits-gmm"}],
                      "solvers": ["amed"], "nfes": [3], "mlflow_tracking_uri": uri})
    noise = _noise(teacher, 3)
    name = None
    for k, (family, s) in enumerate(_samplers(teacher, fine_shard).items()):
        ckpt = F.save_sampler(tmp_path / f"ckpt-{family}", s)
        d = F.describe(s)
        cand = CandidateResult(dataset="digits", solver=d["method"], base_solver="ipndm", nfe=d["nfe"], seed=0,
                               checkpoint_url=str(ckpt), protocol=PROTO, value=1.0 - 0.1 * k, base_value=1.0,
                               family=family, denoiser_calls=d["denoiser_calls"], teacher_id="digits-test",
                               panel_best={"solver": "ipndm", "value": 0.95}, panel_value=0.95,
                               per_sample={"median": 0.1, "p90": 0.2, "p99": 0.3})
        name = "amed-digits-test-nfe3"
        cand = cand.model_copy(update={"nfe": 3})
        res = log_sweep(cfg, [cand])
        assert res.moved[name], family
        champ = load_sampler(f"models:/{name}@champion", tracking_uri=uri)
        assert F.describe(champ)["family"] == family
        assert torch.equal(champ(teacher, noise).x, s(teacher, noise).x), family
        out = fetch(f"models:/{name}@champion", tmp_path / f"fetched-{family}", tracking_uri=uri)
        assert torch.equal(F.load_sampler(out)(teacher, noise).x, s(teacher, noise).x)
    import mlflow

    mv = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, "champion")
    assert mv.tags["family"] == "epd" and mv.tags["denoiser_calls"] == "5" and mv.tags["baseline_value"] == repr(0.95)
    assert mv.tags["per_sample_p99"] == repr(0.3) and float(mv.tags["margin"]) == pytest.approx(0.7 / 0.95)


def test_panel_expand_every_option_set(tmp_path):
    from flows.config import load_sweep
    from flows.plan import plan_sweep

    cfg = load_sweep({"name": "x", "datasets": [{"name": "d", "teacher": "digits-gmm"}], "solvers": ["amed"],
                      "nfes": [3], "store_url": str(tmp_path), "panel": {"entries": [], "expand": ["dpmpp"]}})
    jobs = {b.id: b for b in plan_sweep(cfg).baselines}
    sets = {(jobs[i].schedule["schedule_type"], jobs[i].solver_options["afs"], jobs[i].solver_options["dynamic_thresholding"])
            for i in plan_sweep(cfg).panel_for("d", 3).entries if jobs[i].solver == "dpmpp"}
    assert len(sets) == 12  # 3 schedules x AFS on/off x thresholding on/off
    with pytest.raises(ValueError, match="panel.expand"):
        load_sweep({"datasets": [{"name": "d", "teacher": "digits-gmm"}], "panel": {"expand": ["amed"]}})


def test_cli_train_gits_and_epd_and_sample_panel(tmp_path, capsys):
    import json

    from flows.cli import main

    assert main(["train", "--method", "gits", "--solver", "ipndm", "--nfe", "5", "--teacher", "digits-gmm", "--out",
                 str(tmp_path / "gits"), "--trajectories", "64", "--gits-grid", "21"]) == 0
    g = F.load_sampler(tmp_path / "gits")
    assert F.describe(g)["family"] == "gits" and F.describe(g)["nfe"] == 5
    assert sorted(p.name for p in (tmp_path / "gits").iterdir()) == ["sampler.json", "train.json"]
    assert main(["train", "--method", "epd", "--solver", "ipndm", "--nfe", "5", "--teacher", "digits-gmm", "--out",
                 str(tmp_path / "epd"), "--trajectories", "128", "--epochs", "1"]) == 0
    e = F.describe(F.load_sampler(tmp_path / "epd"))
    assert (e["family"], e["method"], e["nfe"], e["denoiser_calls"]) == ("epd", "epd+ipndm", 5, 8)
    assert main(["train", "--solver", "amed", "--nfe", "3", "--teacher", "digits-gmm", "--out", str(tmp_path / "amed"),
                 "--trajectories", "64", "--no-progress"]) == 0  # the old command keeps working
    capsys.readouterr()
    assert main(["sample", "--panel", "--solvers", "ipndm,dpmpp", "--nfe", "3", "--n", "256", "--rmse-samples", "32",
                 "--reference-steps", "20", "--out-dir", str(tmp_path / "panel")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "panel" / "panel.json").read_text())["rows"]
    assert len(rows) == 6 + 12  # ipndm: 3 schedules x AFS; dpmpp: also x dynamic thresholding
    assert [r["fd"] for r in rows] == sorted(r["fd"] for r in rows) and "* " + rows[0]["solver"] in out
