"""Learned families started from the training-free panel's winner (issue 21, item 3): AMED-Plugins on every
multistep winner (iPNDM, DPM-Solver++, DEIS, UniPC) and Euler / DPM-Solver-2 reproduce it before training, at odd NFE
without AFS too (single-evaluation steps); validation keeps a trained sampler at the winner when training does not
help, flags a diverged run, and stops early; tail objectives; the final-state loss."""

from __future__ import annotations

import math

import pytest
import torch

from amed_core.adapters import load_teacher
from amed_core.amed import AMEDPredictor, FixedPolicy, PredictorConfig, SamplerSpec, TrainConfig, train_amed
from amed_core.families import free
from amed_core.families.init import Winner, amed_init, amed_predictor, amed_spec, epd_init, gits_fine_grid
from amed_core.methods import nfe_for, num_steps_for, solve
from amed_core.schedules import ScheduleSpec
from amed_core.solvers.deis import deis_coefficients, deis_step_weights
from amed_core.solvers.unipc import unipc_coefficients, unipc_step_weights
from amed_core.amed import teacher_states
from amed_core.teacher import TeacherBatch
from amed_core.validation import ValidationSet, tail_objective


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


def _noise(n, shape, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _winner(teacher, solver, nfe, afs, schedule, **options) -> Winner:
    s = free.make(solver, nfe, schedule=ScheduleSpec(*schedule), afs=afs, options=options, denoiser=teacher)
    return Winner(s.spec.solver, s.spec.sigmas, s.spec.afs, s.spec.options, s.spec.schedule)


CASES = [  # (solver, options, schedule): the free solvers a panel can crown
    ("ipndm", {"max_order": 4}, ("polynomial", 0.002, 80.0, 7.0)),
    ("dpmpp", {"max_order": 3, "dynamic_thresholding": False}, ("logsnr", 0.002, 80.0, 1.0)),
    ("dpmpp", {"max_order": 2, "predict_x0": False, "dynamic_thresholding": False}, ("time_uniform", 0.002, 80.0, 1.0)),
    ("deis", {"max_order": 4, "deis_mode": "tab"}, ("time_uniform", 0.002, 80.0, 2.0)),
    ("deis", {"max_order": 3, "deis_mode": "rhoab"}, ("polynomial", 0.002, 80.0, 7.0)),
    ("unipc", {"max_order": 3, "dynamic_thresholding": False}, ("logsnr", 0.002, 80.0, 1.0)),
    ("unipc", {"max_order": 2, "variant": "bh1", "dynamic_thresholding": False}, ("time_uniform", 0.002, 80.0, 1.0)),
    ("euler", {}, ("polynomial", 0.002, 80.0, 7.0)),
]


@pytest.mark.parametrize("solver,options,schedule", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("nfe,afs", [(3, False), (4, False), (5, False), (5, True), (6, True)])
def test_amed_starts_exactly_at_the_winner(teacher, solver, options, schedule, nfe, afs):
    """Before training, the panel-initialised AMED sampler's samples are the winner's (float64, 1e-10), at odd NFE
    without AFS too (one single-evaluation step): the old code forced AFS there (no such start existed)."""
    w = _winner(teacher, solver, nfe, afs, schedule, **options)
    init = amed_init(w)
    assert init.exact and init.nfe == nfe == w.nfe
    spec = amed_spec(init, predictor=PredictorConfig(scale_dir=0.01, scale_time=0.2), denoiser=teacher)
    assert spec.nfe == nfe and spec.afs == afs
    noise = _noise(16, teacher.shape, seed=nfe)
    free_x = solve(w.solver, teacher, noise * w.sigmas[0], torch.tensor(w.sigmas, dtype=torch.float64), afs=w.afs,
                   **w.options)
    pred = amed_predictor(spec, init)
    with torch.no_grad():
        got = solve(spec.solver, teacher, noise * spec.grid()[0], spec.grid(), policy=pred, **spec.solver_options())
    assert got.nfe == free_x.nfe == nfe
    assert torch.allclose(got.x, free_x.x, rtol=0, atol=1e-10 * (1 + float(free_x.x.abs().max())))


def test_single_steps_spend_one_evaluation_and_name_the_fix(teacher):
    assert num_steps_for("amed+ipndm", 5, False, {"single_steps": (0,)}) == 4
    assert nfe_for("amed", 4, False, {"single_steps": (1,)}) == 5
    with pytest.raises(ValueError, match="single_steps"):
        num_steps_for("amed+ipndm", 5, False)
    spec = SamplerSpec.create("amed+ipndm", 5, afs=False, single_steps=(2,), denoiser=teacher)
    assert spec.num_steps == 4 and spec.single_steps == (2,)
    assert SamplerSpec.from_json(spec.to_json()) == spec
    res = solve("amed", teacher, _noise(4, teacher.shape) * 80.0, ScheduleSpec().grid(4), policy=FixedPolicy([0.5] * 3),
                single_steps=[1])
    assert res.nfe == 5
    with pytest.raises(ValueError, match="single_steps .*indices 0..2"):
        solve("amed", teacher, _noise(4, teacher.shape) * 80.0, ScheduleSpec().grid(4), policy=FixedPolicy([0.5] * 3),
              single_steps=[3])


def test_specs_without_the_new_fields_keep_their_json():
    """Fields added for panel starts are left out while unset: a spec's JSON (and so every content-addressed id)
    is what it was."""
    spec = SamplerSpec.create("amed+ipndm", 5, afs=True)
    d = spec.to_dict()
    assert not {"sigmas", "single_steps", "deis_mode", "variant"} & set(d)
    assert "step_bias" not in d["predictor"]
    assert set(TrainConfig().to_dict()) == {"num_trajectories", "batch_size", "lr", "beta1", "beta2", "eps", "seed",
                                            "teacher_solver", "teacher_M", "teacher_afs", "restart", "epochs", "dtype",
                                            "loss_weighting"}


@pytest.mark.parametrize("mode", ["tab", "rhoab"])
def test_deis_per_sample_weights_match_the_grid_weights(mode):
    grid = ScheduleSpec("time_uniform", rho=2.0).grid(7)
    ref = deis_coefficients(grid, 4, mode)
    for i in range(1, 6):
        order = min(4, i + 1)
        got = deis_step_weights([torch.full((3,), float(t), dtype=torch.float64) for t in grid[i + 1 - order:i + 1]], grid[i + 1], mode)
        assert [float(g[0]) for g in got] == pytest.approx(ref[i], rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("predict_x0,variant", [(True, "bh2"), (False, "bh1")])
def test_unipc_per_sample_weights_match_the_grid_weights(predict_x0, variant):
    ts = [float(t) for t in ScheduleSpec("logsnr").grid(6)]
    for order in (1, 2, 3):
        hist = ts[:order]
        a, pred, corr = unipc_coefficients(hist, ts[order], order, predict_x0=predict_x0, variant=variant,
                                           corrector=True)
        ta, tp, tc = unipc_step_weights([torch.full((2,), t, dtype=torch.float64) for t in hist], ts[order], order, predict_x0=predict_x0,
                                        variant=variant, corrector=True)
        assert float(ta[1]) == pytest.approx(a, rel=1e-12)
        assert [float(v[1]) for v in tp] == pytest.approx(pred, rel=1e-10, abs=1e-13)
        assert [float(v[1]) for v in tc] == pytest.approx(corr, rel=1e-10, abs=1e-13)


def _trajectories(teacher, spec, n, seed):
    noise = _noise(n, teacher.shape, seed=seed)
    states, _ = teacher_states(teacher, spec, noise, solver="heun", M=8)
    return TeacherBatch(noise=noise, class_labels=None, states=states)


def _start(teacher, nfe, batch, n_batches):
    """An iPNDM winner (poly-7, no AFS), AMED's start on it, 64 held-out trajectories and training batches."""
    w = _winner(teacher, "ipndm", nfe, False, ("polynomial", 0.002, 80.0, 7.0), max_order=4)
    init = amed_init(w)
    spec = amed_spec(init, denoiser=teacher)
    val = ValidationSet.from_batches([_trajectories(teacher, spec, 64, seed=99)])
    return w, init, spec, val, [_trajectories(teacher, spec, batch, seed=s) for s in range(n_batches)]


def test_validation_keeps_the_winner_when_training_only_hurts(teacher):
    """A run that diverges (Adam lr 5 on a panel start) is flagged, and validation hands back the start: the winner."""
    w, init, spec, val, batches = _start(teacher, 5, 32, 4)
    cfg = TrainConfig(num_trajectories=128, batch_size=32, lr=5.0, val_every=1, diverge_factor=2.0)
    res = train_amed(teacher, spec, cfg, batches, predictor=amed_predictor(spec, init), validation=val)
    v = res.validation
    assert v["first"] == pytest.approx(val.score(lambda n, lab: w.sampler()(teacher, n).x), rel=1e-9)
    assert res.diverged and v["diverged"] and not v["improved"]
    noise = _noise(8, teacher.shape, seed=3)
    with torch.no_grad():
        got = solve(spec.solver, teacher, noise * spec.grid()[0], spec.grid(), policy=res.predictor,
                    **spec.solver_options()).x
    assert torch.allclose(got, w.sampler()(teacher, noise).x, atol=1e-9)


def test_validation_picks_an_improvement_and_stops_early(teacher):
    w, init, spec, val, batches = _start(teacher, 3, 64, 3)
    cfg = TrainConfig(num_trajectories=192, batch_size=64, lr=2e-2, epochs=20, val_every=3, patience=2,
                      loss_weighting="relative")
    res = train_amed(teacher, spec, cfg, batches, predictor=amed_predictor(spec, init), validation=val)
    v = res.validation
    assert v["improved"] and v["best"] < v["first"] and not res.diverged
    assert res.stopped_early and res.trajectories < 192 * 20
    with torch.no_grad():  # the restored state scores what the tracker recorded as best
        score = val.score(lambda n, lab: solve(spec.solver, teacher, n * spec.grid()[0], spec.grid(),
                                               policy=res.predictor, **spec.solver_options()).x)
    assert score == pytest.approx(v["best"], rel=1e-9)


def test_tail_objectives_and_the_final_state_loss(teacher):
    e = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert float(tail_objective(e, "mean", 1.0)) == 4.0
    assert float(tail_objective(e, "topk:0.25", 1.0)) == 14.0
    assert float(tail_objective(e, "q:0.5", 2.0)) == pytest.approx(4.0 + 2 * 2.5)
    with pytest.raises(ValueError, match="objective must be"):
        TrainConfig(objective="top:0.1")
    spec = SamplerSpec.create("amed+ipndm", 3, afs=True, afs_in_history=False, denoiser=teacher)
    batches = [_trajectories(teacher, spec, 32, seed=s) for s in range(2)]
    for cfg in (TrainConfig(num_trajectories=64, batch_size=32, loss_target="final"),
                TrainConfig(num_trajectories=64, batch_size=32, objective="topk:0.1")):
        res = train_amed(teacher, spec, cfg, batches)
        assert res.updates == (2 if cfg.loss_target == "final" else 4)
        assert all(math.isfinite(v) for b in res.losses for v in b)


def test_epd_and_gits_start_on_the_winners_grid(teacher):
    w = _winner(teacher, "deis", 6, False, ("time_uniform", 0.002, 80.0, 2.0))
    e = epd_init(w, 6, 2)
    assert e.sigmas == w.sigmas[::2] and not e.afs and len(e.r) == 3 and all(len(r) == 2 for r in e.r)
    e5 = epd_init(w, 5, 2)
    assert e5.afs and len(e5.sigmas) == num_steps_for("epd", 5, True)
    fine = gits_fine_grid(ScheduleSpec().grid(11), w.sigmas)
    assert all(any(abs(float(f) - s) <= 1e-12 * s for f in fine) for s in w.sigmas)


def test_benchmarks_factor_table_is_what_the_committed_results_print():
    """BENCHMARKS "Learned vs free" quotes ``bench/factors.py --table ... --compact`` on the committed result files:
    every row printed is in BENCHMARKS.md as printed (a change to the table code or the files shows here)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = ["bench/factors_unet.json", "bench/factors_gmm.json", "bench/factors_heldout.json"]
    out = subprocess.run([sys.executable, "bench/factors.py", "--table", *files, "--compact"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [r for r in out.stdout.splitlines() if r.startswith("| ")]
    assert len(rows) == 20 and rows[0].startswith("| factor | setting | digits-tiny-unet 3 |")
    bench = (root / "BENCHMARKS.md").read_text().splitlines()
    assert [r for r in rows if r not in bench] == []
