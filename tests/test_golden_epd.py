"""EPD-Solver / EPD-Plugin golden cases ($AMED_GOLDEN_DIR/epd/*.npz, reference BeierZhu/EPD branch EPD-Solver):
parameter mapping, schedule, trajectory, the three NFE counts, and the sequential form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amed_core import schedules
from amed_core.methods.epd import (EPDParams, FixedEPDParams, epd, epd_ipndm, epd_net_calls, epd_nfe, epd_total_evals,
                                   intermediate_times)
from golden_cases import GOLDEN_DIR, load_case, model_for, schedule_kwargs

EPD_DIR = GOLDEN_DIR / "epd"
CASES = sorted(EPD_DIR.glob("*.npz")) if EPD_DIR.is_dir() else []
if not CASES:
    pytest.skip(f"no EPD golden cases: {EPD_DIR} is missing or empty", allow_module_level=True)

SAMPLERS = {"epd": epd, "epd+ipndm": epd_ipndm}


class CallCounter(torch.nn.Module):
    """Wraps a denoiser and counts forward calls and per-sample rows."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.inner(x, sigma, class_labels)


def params_for(case: dict) -> EPDParams:
    return EPDParams.from_raw(case["raw_r_params"], case["raw_weight_s"], case["raw_scale_dir_params"],
                              case["raw_scale_time_params"], scale_dir=float(case["scale_dir"]),
                              scale_time=float(case["scale_time"]), fcn=bool(case["fcn"]))


def run_case(case: dict, params, *, batched: bool):
    t_steps = torch.from_numpy(case["t_steps"])
    x = torch.from_numpy(np.asarray(case["noise"], dtype=np.float64)) * t_steps[0]
    net = CallCounter(model_for(case))
    options = dict(afs=bool(case["afs"]), denoise_to_zero=bool(case["denoise_to_zero"]), return_trajectory=True,
                   batched=batched)
    if case["solver"] == "epd+ipndm":
        options["max_order"] = int(case["max_order"])
    with torch.no_grad():
        result = SAMPLERS[case["solver"]](net, x, t_steps, policy=params, **options)
    return result, net.calls


def check_trajectory(case: dict, got: torch.Tensor):
    ref = case["trajectory"]
    got = got.numpy()
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    tol = 1e-8 * (1 + float(np.abs(ref).max()))
    assert err <= tol, f"max abs error {err:.3e} > tolerance {tol:.3e}"


IDS = [p.stem for p in CASES]


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_schedule(path):
    case = load_case(path)
    t = schedules.get_schedule(int(case["num_steps"]), float(case["sigma_min"]), float(case["sigma_max"]), **schedule_kwargs(case))
    np.testing.assert_allclose(t.numpy(), case["t_steps"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_parameter_mapping(path):
    case = load_case(path)
    p = params_for(case)
    assert p.num_points == int(case["K"]) == int(case["num_points"])
    tab = p.tables()
    for ours, theirs in (("r", "epd_r"), ("weight", "epd_weights"), ("scale_dir", "epd_scale_dir"),
                         ("scale_time", "epd_scale_time")):
        np.testing.assert_allclose(tab[ours].numpy(), case[theirs], rtol=0, atol=1e-12, err_msg=ours)
    t = torch.from_numpy(case["t_steps"])
    t_mid = intermediate_times(t[:-1, None], t[1:, None], tab["r"])
    np.testing.assert_allclose(t_mid.numpy(), case["epd_t_mid"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", CASES, ids=IDS)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "loop"])
def test_case(path, batched):
    case = load_case(path)
    result, calls = run_case(case, params_for(case), batched=batched)
    check_trajectory(case, result.trajectory)
    np.testing.assert_array_equal(result.x.numpy(), result.trajectory[-1].numpy())
    n, K, afs, dtz = int(case["num_steps"]), int(case["K"]), bool(case["afs"]), bool(case["denoise_to_zero"])
    assert result.paper_nfe == int(case["nfe"]) == epd_nfe(n, afs, dtz)
    assert result.nfe == int(case["nfe_total"]) == epd_total_evals(n, K, afs, dtz)
    assert result.net_calls == calls == epd_net_calls(n, K, afs, dtz, batched=batched)
    # the reference: epd_parallel_sampler batches the K points, the plugin loops over them
    reference_batched = case["solver"] == "epd"
    if batched == reference_batched:
        assert calls == int(case["net_calls"])


@pytest.mark.parametrize("path", [p for p in CASES if load_case(p)["solver"] == "epd"],
                         ids=[p.stem for p in CASES if load_case(p)["solver"] == "epd"])
def test_sequential_form_agrees(path):
    """epd_sampler (K calls, running sum) against epd_parallel_sampler (one batched call, summed over K)."""
    case = load_case(path)
    par, _ = run_case(case, params_for(case), batched=True)
    seq, _ = run_case(case, params_for(case), batched=False)
    diff = float((par.trajectory - seq.trajectory).abs().max())
    ref = float(case["max_diff_sequential"])
    assert diff <= max(2e-12, 2 * ref)
    if int(case["K"]) == 1:
        assert diff == ref == 0.0


@pytest.mark.parametrize("path", CASES[:4], ids=IDS[:4])
def test_fixed_params_match_learned_form(path):
    case = load_case(path)
    fixed = FixedEPDParams(case["epd_r"], case["epd_weights"], case["epd_scale_dir"], case["epd_scale_time"])
    result, _ = run_case(case, fixed, batched=True)
    check_trajectory(case, result.trajectory)
    assert np.abs(params_for(case).fixed().r - case["epd_r"]).max() <= 1e-12
