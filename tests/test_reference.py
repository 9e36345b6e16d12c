"""One near-exact reference per (teacher, evaluation seeds) under metric rmse (issue 21, item 4): it is the README's
reference (DPM-Solver++(3M) on log-SNR points, float64) of exactly the evaluation's noise, stored beside the teacher
(content-addressed shards, resumed, shared by every evaluate job), its convergence N vs 2N - 1 points recorded, and
every candidate and panel entry of a sweep scores against it. The planning and eval-job tests failed before (each
evaluate job solved its own reference with the teacher's solver on the candidate's own schedule)."""

from __future__ import annotations

import os

import pytest
import torch

from amed_core.denoisers import load_teacher
from amed_core.evaluate import (reference_check_spec, reference_convergence, reference_final_states, reference_solution,
                                reference_spec)
from amed_core.schedules import ScheduleSpec
from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard, trajectory_inputs

SEED, N = 1_000_000, 24


@pytest.fixture(scope="module")
def gmm():
    return load_teacher("digits-gmm")


def test_reference_is_the_readme_reference_of_the_evaluation_noise(gmm):
    spec = reference_spec(gmm, seed=SEED, num_samples=N, num_points=65, shard_size=10)
    assert spec.num_shards == 3 and len(spec.teacher_grid()) == 65 and spec.dtype == "float64"
    x = reference_final_states(spec, [generate_shard(gmm, spec, i) for i in range(spec.num_shards)])
    noise, _ = trajectory_inputs(range(SEED, SEED + N), gmm.shape)
    direct = reference_solution(gmm, noise, num_steps=65)
    torch.testing.assert_close(x, direct, rtol=0, atol=1e-10)  # log-SNR grid by refinement == by formula
    with pytest.raises(ValueError, match="does not match the evaluation seeds"):
        reference_final_states(spec, [generate_shard(gmm, spec, 1)])


def test_convergence_check_shrinks_with_points(gmm):
    errs = []
    for points in (9, 17, 33):
        spec = reference_spec(gmm, seed=SEED, num_samples=8, num_points=points)
        check = reference_check_spec(spec, 8)
        assert len(check.teacher_grid()) == 2 * points - 1 and check.base_seed == SEED
        x_n = reference_final_states(spec, [generate_shard(gmm, spec, 0)])
        x_2n = reference_final_states(check, [generate_shard(gmm, check, 0)])
        errs.append(reference_convergence(x_n, x_2n, points=points)["rmse"])
    assert errs[0] > errs[1] > errs[2] > 0 and errs[0] / errs[2] > 20  # third order: ~8x per doubling


def test_kept_states_equal_the_whole_trajectory_path(gmm):
    """generate_shard keeps only the union grid's states from the step callback when the teacher grid is much longer;
    the content is the same bits as slicing the whole trajectory (what it did before)."""
    from amed_core.methods import solve
    from amed_core.schedules import grid_indices

    sch = ScheduleSpec("polynomial", rho=7.0)
    spec = TeacherSpec.for_denoiser(gmm, [StudentGrid(sch, 4)], num_trajectories=6, shard_size=6, sub_steps=3)
    shard = generate_shard(gmm, spec, 0)
    grid = spec.teacher_grid()
    noise, _ = trajectory_inputs(spec.seeds(0), gmm.shape)
    with torch.no_grad():
        traj = solve("heun", gmm, noise * grid[0], grid, return_trajectory=True).trajectory
    assert torch.equal(shard.states, traj[grid_indices(grid, spec.union_grid())].to(shard.states.dtype))


def test_stored_reference_is_generated_once_and_resumed(tmp_path, gmm):
    from flows.references import load_reference
    from flows.storage import TeacherStore

    spec = reference_spec(gmm, seed=SEED, num_samples=N, num_points=33, shard_size=8)
    url = str(tmp_path / "store")
    x = load_reference(spec.to_json(), url, None, gmm, N)
    store = TeacherStore(url)
    shard_files = sorted((tmp_path / "store" / "teachers" / spec.spec_hash).glob("shard-*.safetensors"))
    assert len(shard_files) == 3 and store.verify(spec.spec_hash).passed
    stamps = [f.stat().st_mtime_ns for f in shard_files]
    assert torch.equal(load_reference(spec.to_json(), url, None, gmm, N), x)  # read, not recomputed
    assert [f.stat().st_mtime_ns for f in shard_files] == stamps
    os.remove(shard_files[1])  # lost: `amed teacher repair` drops its record, the next evaluation regenerates it
    store.repair(spec.spec_hash)
    assert torch.equal(load_reference(spec.to_json(), url, None, gmm, N), x)  # only the missing shard again
    assert shard_files[0].stat().st_mtime_ns == stamps[0] and shard_files[2].stat().st_mtime_ns == stamps[2]


def _rmse_sweep(tmp_path, init="recipe", **evaluation):
    from flows.config import load_sweep

    return load_sweep({"name": "ref", "datasets": [{"name": "digits", "teacher": "digits-gmm"}], "solvers": ["amed"],
                       "nfes": [3, 5], "store_url": str(tmp_path / "store"), "register_models": False,
                       "families": {"gits": {"solvers": ["ipndm"]}}, "init": {"mode": init},
                       "panel": {"entries": [{"solver": "ipndm"}, {"solver": "deis"}], "expand": []},
                       "evaluation": {"metric": "rmse", "num_samples": 16, "batch_size": 16, "reference_steps": 33,
                                      "reference_check_samples": 8, **evaluation}})


def test_panel_started_plans_score_against_the_same_stored_reference(tmp_path):
    """init.mode panel (the default): the pending plan (panel + ranking) and the plan completed from the winners
    carry the one stored reference into every evaluate job, the panel-started candidates' included."""
    from flows.plan import plan_sweep

    cfg = _rmse_sweep(tmp_path, init="panel")
    pending = plan_sweep(cfg)
    assert pending.pending_init and not pending.candidates
    roles = {t.role: t for t in pending.teachers}
    assert {"reference", "reference_check"} <= set(roles)
    ref = roles["reference"].spec_json
    assert {b.reference_spec for b in pending.baselines} == {ref}
    winners = {("digits", nfe): next(b for b in pending.baselines if b.nfe == nfe and b.solver == "ipndm")
               for nfe in (3, 5)}
    plan = plan_sweep(cfg, winners=winners)
    assert plan.candidates and {c.eval.reference_spec for c in plan.candidates} == {ref}
    assert {t.reference_spec for t in plan.teachers if t.role in ("students", "gits")} == {ref}


def test_every_evaluate_job_of_a_sweep_scores_against_one_stored_reference(tmp_path, gmm):
    from flows.cluster.jobs import eval_job
    from flows.plan import plan_sweep

    plan = plan_sweep(_rmse_sweep(tmp_path))
    roles = {t.role: t for t in plan.teachers}
    assert set(roles) == {"students", "gits", "reference", "reference_check"}
    ref, check = TeacherSpec.from_json(roles["reference"].spec_json), TeacherSpec.from_json(roles["reference_check"].spec_json)
    assert ref.solver == "dpmpp" and ref.solver_options["max_order"] == 3 and len(ref.teacher_grid()) == 33
    assert ref.base_seed == plan.candidates[0].eval.protocol.seed and ref.num_trajectories == 16
    assert check.num_trajectories == 8 and len(check.teacher_grid()) == 65
    jobs = [c.eval for c in plan.candidates] + list(plan.baselines)
    assert len(jobs) > 6 and {j.reference_spec for j in jobs} == {roles["reference"].spec_json}
    assert roles["reference"].spec_hash[:16] in plan.candidates[0].protocol.reference
    # a panel entry scored by eval_job: its value is the RMSE to the stored reference of the same noise
    base = next(b for b in plan.baselines if b.solver == "deis" and b.nfe == 5)
    rec = eval_job(base)
    noise, _ = trajectory_inputs(range(ref.base_seed, ref.base_seed + 16), gmm.shape)
    from amed_core.families import StaticSampler, StaticSpec

    sigmas = ScheduleSpec.from_dict(base.schedule).grid(base.num_steps)
    opts = dict(base.solver_options)
    afs = opts.pop("afs")
    x = StaticSampler(StaticSpec("free", "deis", "deis", 5, tuple(float(v) for v in sigmas), afs, opts, base.schedule,
                                 {}))(gmm, noise).x
    want = ((x - reference_solution(gmm, noise, num_steps=33)) ** 2).mean().sqrt()
    assert rec["value"] == pytest.approx(float(want), rel=1e-9)
    assert rec["errors_key"].endswith(".errors.safetensors") and len(rec["errors_sha256"]) == 64

    # what the register stage adds: the margin's interval from the stored per-sample errors, the reference's record
    from flows.references import load_reference, reference_records
    from flows.report import MarginIntervals
    from flows.storage import RunStore

    other = eval_job(next(b for b in plan.baselines if b.solver == "ipndm" and b.nfe == 5))
    store = RunStore(plan.store_url)
    lo, hi = MarginIntervals(store)(rec, other)
    assert lo <= rec["value"] / other["value"] <= hi
    assert reference_records(plan)[0]["convergence"] is None  # the check is not generated yet
    load_reference(roles["reference_check"].spec_json, plan.store_url, None, gmm, 8)
    conv = reference_records(plan)[0]["convergence"]
    x_n = reference_solution(gmm, noise[:8], num_steps=33)
    x_2n = reference_solution(gmm, noise[:8], num_steps=65)
    assert conv["points"] == 33 and conv["check_points"] == 65 and conv["num_samples"] == 8
    assert conv["rmse"] == pytest.approx(float(((x_n - x_2n) ** 2).mean().sqrt()), rel=1e-6)
    store.put(rec["errors_key"], store.get(other["errors_key"]))  # a changed file is refused, not used
    with pytest.raises(ValueError, match="checksum mismatch"):
        MarginIntervals(store)(rec, other)


def test_a_solver_with_its_own_sigma_range_is_refused_under_rmse(tmp_path):
    from flows.config import load_sweep
    from flows.plan import plan_sweep

    cfg = _rmse_sweep(tmp_path).model_dump()
    cfg["solver_options"] = {"amed": {"sigma_min": 0.01}}
    with pytest.raises(ValueError, match="solver_options.amed.sigma_min: 0.01 differs from the sweep's sigma_min"):
        plan_sweep(load_sweep(cfg))
