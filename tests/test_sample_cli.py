"""amed_core.evaluate (seeded noise, NFE -> grid, sampling, reference solution, table, pictures) and `amed sample`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from amed_core import evaluate
from amed_core.denoisers import load_teacher
from amed_core.schedules import ScheduleSpec
from flows.cli import main


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


def test_seeded_noise_does_not_depend_on_batching_or_dtype():
    a = evaluate.seeded_noise(range(10, 16), (1, 8, 8))
    b = evaluate.seeded_noise([13, 14], (1, 8, 8))
    assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float64
    torch.testing.assert_close(a[3:5], b, rtol=0, atol=0)
    c = evaluate.seeded_noise([13], (1, 8, 8), dtype=torch.float32)
    torch.testing.assert_close(c[0], a[3].float(), rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    # roughly standard normal
    big = evaluate.seeded_noise(range(200), (64,))
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02


@pytest.mark.parametrize("solver,nfe,afs,N", [
    ("euler", 3, False, 4), ("euler", 3, True, 5), ("heun", 4, False, 3), ("heun", 3, True, 3), ("heun", 9, True, 6),
    ("dpm2", 5, True, 4), ("dpmpp", 9, False, 10), ("unipc", 5, False, 6), ("deis", 7, False, 8), ("ipndm", 1, False, 2),
])
def test_num_steps_for(solver, nfe, afs, N):
    assert evaluate.num_steps_for(solver, nfe, afs) == N


@pytest.mark.parametrize("solver,nfe,afs,field", [
    ("heun", 3, False, "afs=True"), ("dpm2", 4, True, "afs=False"), ("euler", 0, False, "nfe"),
    ("bogus", 3, False, "unknown solver"), ("euler", 2.5, False, "nfe"),
])
def test_num_steps_for_rejects(solver, nfe, afs, field):
    with pytest.raises(ValueError, match=field):
        evaluate.num_steps_for(solver, nfe, afs)


@pytest.mark.parametrize("solver", evaluate.BASE_SOLVERS)
def test_sample_solver_spends_the_nfe_and_ignores_batching(teacher, solver):
    a = evaluate.sample_solver(teacher, solver, 5, 6, seed=3, batch_size=6)
    b = evaluate.sample_solver(teacher, solver, 5, 6, seed=3, batch_size=4)
    assert a.nfe == 5 and a.num_steps == evaluate.num_steps_for(solver, 5, a.afs)
    assert a.afs == (solver in ("heun", "dpm2"))
    torch.testing.assert_close(a.x, b.x, rtol=1e-12, atol=1e-12)
    c = evaluate.sample_solver(teacher, solver, 5, 2, seed=7)           # samples 7, 8 = rows 4, 5 above
    torch.testing.assert_close(c.x, a.x[4:], rtol=1e-12, atol=1e-12)
    assert a.x.shape == (6, 1, 8, 8) and torch.isfinite(a.x).all()


def test_sample_solver_rejects_bad_options(teacher):
    with pytest.raises(ValueError, match="max_orderr"):
        evaluate.sample_solver(teacher, "dpmpp", 5, 2, 0, options={"max_orderr": 2})
    with pytest.raises(ValueError, match="unknown solver"):
        evaluate.sample_solver(teacher, "rk4", 5, 2, 0)
    with pytest.raises(ValueError, match="n "):
        evaluate.sample_solver(teacher, "euler", 5, 0, 0)


def test_reference_solution_is_converged(teacher):
    """500 points agree with 1000 points (and beat a 100-point run by far): the documented error holds."""
    noise = evaluate.seeded_noise(range(4), teacher.shape)
    r500 = evaluate.reference_solution(teacher, noise)
    r1000 = evaluate.reference_solution(teacher, noise, num_steps=1000)
    r100 = evaluate.reference_solution(teacher, noise, num_steps=100)
    assert evaluate.rmse(r500, r1000) < 3e-5
    assert evaluate.rmse(r100, r1000) > 10 * evaluate.rmse(r500, r1000)


def test_quality_table_improves_with_nfe(teacher):
    tab = evaluate.quality_table(teacher, ["euler", "ipndm"], [3, 9], 128, seed=0, rmse_samples=32, reference_steps=200)
    assert [(r.solver, r.nfe) for r in tab.rows] == [("euler", 3), ("euler", 9), ("ipndm", 3), ("ipndm", 9)]
    by = {(r.solver, r.nfe): r for r in tab.rows}
    for s in ("euler", "ipndm"):
        assert by[s, 9].rmse < by[s, 3].rmse and by[s, 9].fd < by[s, 3].fd
    assert by["ipndm", 9].rmse < by["euler", 9].rmse                  # higher order wins at equal NFE
    assert 0 < tab.fd_floor < by["euler", 3].fd
    json.dumps(tab.to_dict())
    text = evaluate.format_table(tab)
    assert "ipndm" in text and "FD floor" in text


def test_save_grid_png(tmp_path):
    x = torch.linspace(-1.5, 1.5, 5 * 64).reshape(5, 1, 8, 8)
    p = evaluate.save_grid_png(x, tmp_path / "g" / "grid.png", nrow=3, scale=2)
    img = np.asarray(Image.open(p))
    assert img.shape == (2 * (2 * 9 + 1), 2 * (3 * 9 + 1))               # 2 rows x 3 columns, 1-px padding, x2
    assert img.min() == 0 and img.max() == 255
    with pytest.raises(ValueError, match="samples"):  # any channel count draws (issue 19); no batch axis does not
        evaluate.save_grid_png(torch.zeros(2, 8, 8), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_amed_sample_cli(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--teacher", "digits-gmm", "--solvers", "euler,heun,dpmpp", "--nfe", "3,5", "--n", "64",
               "--seed", "5", "--out-dir", str(out), "--rmse-samples", "16", "--reference-steps", "100",
               "--grid-per-row", "8"])
    assert rc == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.split() and ln.split()[0] in ("euler", "heun", "dpmpp")]
    assert len(lines) == 6
    heun3 = next(ln for ln in lines if ln.split()[:2] == ["heun", "3"]).split()
    assert heun3[2:4] == ["3", "yes"]                                      # N = 3 with AFS for NFE 3
    record = json.loads((out / "quality.json").read_text())
    assert len(record["rows"]) == 6 and record["n"] == 64 and record["teacher"] == "digits-gmm"
    assert all(np.isfinite([r["fd"], r["rmse"]]).all() for r in record["rows"])
    grid = Image.open(out / "samples.png")
    assert grid.format == "PNG" and grid.size[0] > grid.size[1]            # 8 per row, 4 rows (3 solvers + exact)
    assert Image.open(out / "quality.png").format == "PNG"


@pytest.mark.parametrize("argv,message", [
    (["--solvers", "euler,rk4"], "--solvers: unknown solver 'rk4'"),
    (["--nfe", "3,x"], "--nfe must be comma-separated int"),
    (["--solvers", "heun", "--nfe", "3", "--afs", "off"], "afs=True"),
    (["--teacher", "nope"], "unknown teacher"),
    (["--n", "1"], "--n must be at least 2"),
])
def test_amed_sample_cli_rejects_bad_input(tmp_path, capsys, argv, message):
    rc = main(["sample", "--out-dir", str(tmp_path / "o"), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A neural teacher (no exact samples): RMSE only, FD n/a, in both modes.

@pytest.fixture(scope="module")
def unet():
    return load_teacher("digits-tiny-unet")


def test_quality_table_without_exact_samples_is_rmse_only(unet):
    assert not evaluate.has_exact_samples(unet) and evaluate.has_exact_samples(load_teacher("digits-gmm"))
    tab = evaluate.quality_table(unet, ["euler"], [3, 9], 8, seed=0, rmse_samples=8, reference_steps=60)
    assert not tab.has_fd and tab.fd_floor is None
    assert [r.fd for r in tab.rows] == [None, None] and [r.fd_exact for r in tab.rows] == [None, None]
    assert tab.rows[1].rmse < tab.rows[0].rmse                           # more NFE, closer to the ODE solution
    assert json.loads(json.dumps(tab.to_dict()))["rows"][0]["fd"] is None
    assert "FD n/a" in evaluate.format_table(tab) and "n/a" in evaluate.format_table(tab).splitlines()[2]


def test_amed_sample_cli_neural_teacher(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--teacher", "digits-tiny-unet", "--solvers", "euler,ipndm", "--nfe", "3,5", "--n", "16",
               "--out-dir", str(out), "--rmse-samples", "8", "--reference-steps", "60", "--grid-per-row", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "RMSE to the near-exact ODE solution only; FD n/a" in text.splitlines()[1]   # the header says so
    lines = [ln.split() for ln in text.splitlines() if ln.split() and ln.split()[0] in ("euler", "ipndm")]
    assert len(lines) == 4 and all(ln[4:6] == ["n/a", "n/a"] for ln in lines)
    record = json.loads((out / "quality.json").read_text())
    assert record["teacher"] == "digits-tiny-unet" and record["fd_floor"] is None
    assert all(r["fd"] is None and np.isfinite(r["rmse"]) for r in record["rows"])
    by = {(r["solver"], r["nfe"]): r["rmse"] for r in record["rows"]}
    assert by["euler", 5] < by["euler", 3] and by["ipndm", 5] < by["ipndm", 3]
    assert Image.open(out / "samples.png").size == (16 * (4 * 9 + 1), 16 * (2 * 9 + 1))  # 4 x 2 rows: no exact row; 8 px -> 128 px
    assert Image.open(out / "quality.png").format == "PNG"


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory, unet):
    """An (untrained) amed+ipndm checkpoint for the tiny UNet: sampling does not care how good it is."""
    from amed_core.amed import AMEDPredictor, SamplerSpec, save_checkpoint
    from amed_core.schedules import ScheduleSpec

    spec = SamplerSpec.create("amed+ipndm", 3, afs=True, denoiser=unet,
                              schedule=ScheduleSpec("polynomial", rho=7.0, sigma_min=unet.sigma_min, sigma_max=unet.sigma_max))
    return save_checkpoint(tmp_path_factory.mktemp("unet-ckpt"), AMEDPredictor(spec.predictor, seed=0), spec)


def test_amed_sample_predictor_neural_teacher_from_checkpoint(tmp_path, capsys, unet_checkpoint):
    out = tmp_path / "eval"
    rc = main(["sample", "--predictor", str(unet_checkpoint), "--n", "12", "--rmse-samples", "6",
               "--reference-steps", "40", "--out-dir", str(out), "--grid-per-row", "4"])   # no --teacher: the checkpoint's
    assert rc == 0
    text = capsys.readouterr().out
    assert "on digits-tiny-unet" in text.splitlines()[0] and "FD n/a" in text.splitlines()[1]
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] and ln.split()[0].split("[")[0] in ("amed+ipndm", "ipndm")]
    # the base is named with its options (one baseline name everywhere, issue 19): ipndm[schedule,afs=...,...]
    assert [[r[0].split("[")[0], *r[1:3]] for r in rows] == [["amed+ipndm", "3", "n/a"], ["ipndm", "3", "n/a"]]
    record = json.loads((out / "predictor-quality.json").read_text())
    assert record["teacher"] == "digits-tiny-unet"
    assert [r["fd"] for r in record["rows"]] == [None, None] and all(np.isfinite(r["rmse"]) for r in record["rows"])
    assert (out / "predictor-samples.png").stat().st_size > 0 and (out / "policy.png").stat().st_size > 0


def test_amed_sample_predictor_refuses_another_teacher(tmp_path, capsys, unet_checkpoint):
    rc = main(["sample", "--predictor", str(unet_checkpoint), "--teacher", "digits-gmm", "--n", "4",
               "--out-dir", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--teacher 'digits-gmm'" in err and "not the teacher this checkpoint was trained for" in err
    assert not (tmp_path / "o" / "predictor-quality.json").exists()


def test_amed_sample_predictor_unknown_teacher_needs_teacher_flag(tmp_path, capsys, unet_checkpoint):
    from amed_core.amed import load_sampler, save_checkpoint

    sampler = load_sampler(unet_checkpoint)
    spec = dataclasses.replace(sampler.spec, teacher={"adapter": "edm-network", "name": "elsewhere", "content_sha256": "0" * 64})
    ckpt = save_checkpoint(tmp_path / "ck", sampler.predictor, spec)
    rc = main(["sample", "--predictor", str(ckpt), "--n", "4", "--out-dir", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'elsewhere'" in err and "none of the built-in teachers" in err and "--teacher NAME" in err
