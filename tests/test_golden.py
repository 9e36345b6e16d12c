"""Every reference case in AMED_GOLDEN_DIR must be reproduced: schedule, trajectory and NFE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amed_core import methods, schedules
from golden_cases import GOLDEN_DIR, case_files, load_case, model_for, noise, schedule_kwargs, solver_call, tolerance

CASES = case_files()
if not CASES:
    pytest.skip(f"no golden cases: AMED_GOLDEN_DIR={GOLDEN_DIR} is missing or empty", allow_module_level=True)

SOLVER_CASES = [p for p in CASES if not p.name.startswith("amed-")]
AMED_CASES = [p for p in CASES if p.name.startswith("amed-")]


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_schedule(path):
    case = load_case(path)
    t = schedules.get_schedule(int(case["num_steps"]), float(case["sigma_min"]), float(case["sigma_max"]), **schedule_kwargs(case))
    np.testing.assert_allclose(t.numpy(), case["t_steps"], rtol=1e-12, atol=0)


def _check(case, result):
    ref = case["trajectory"]
    got = result.trajectory.numpy()
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    tol = tolerance(case, ref)
    assert err <= tol, f"max abs error {err:.3e} > tolerance {tol:.3e}"
    assert result.nfe == int(case["nfe"]), f"nfe {result.nfe} != reference {int(case['nfe'])}"


@pytest.mark.parametrize("path", SOLVER_CASES, ids=[p.stem for p in SOLVER_CASES])
def test_solver_case(path):
    case = load_case(path)
    name, options = solver_call(case)
    t_steps = torch.from_numpy(case["t_steps"])
    with torch.no_grad():
        result = methods.solve(name, model_for(case), noise(case) * t_steps[0], t_steps, **options)
    _check(case, result)


def amed_call(case: dict) -> tuple[str, dict]:
    """Our solver name and options for an AMED case; the predictor's per-step outputs become a FixedPolicy."""
    from amed_core.amed import FixedPolicy

    s = case["solver"]
    options = dict(afs=bool(case["afs"]), denoise_to_zero=bool(case["denoise_to_zero"]), return_trajectory=True,
                   policy=FixedPolicy(case["amed_r"], case["amed_scale_dir"], case["amed_scale_time"]))
    if s in ("amed+ipndm", "amed+dpmpp"):
        options["max_order"] = int(case["max_order"])
    if s == "amed+dpmpp":  # the reference thresholds data predictions (dynamic_thresholding follows predict_x0)
        options.update(predict_x0=bool(case["predict_x0"]), lower_order_final=bool(case["lower_order_final"]),
                       dynamic_thresholding=bool(case["dynamic_thresholding"]))
    return s, options


@pytest.mark.parametrize("path", AMED_CASES, ids=[p.stem for p in AMED_CASES])
def test_amed_case(path):
    case = load_case(path)
    name, options = amed_call(case)
    t_steps = torch.from_numpy(case["t_steps"])
    with torch.no_grad():
        result = methods.solve(name, model_for(case), noise(case) * t_steps[0], t_steps, **options)
    _check(case, result)
