"""GS (the Generalized Solver, arXiv 2510.17699) golden cases ($AMED_GOLDEN_DIR/gs/*.npz, reference 3145tttt/GAS @
f090ede, run in float64 on the exact digits mixture): the VP re-mapping, the grid from its logits and their inverse,
the S4S initial coefficients, every step's values and linear update, the data predictions and the trajectory, with
the README's tolerances; plus the quirks' fixes against the reference behaviour they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amed_core.methods.gs import GSConfig, GSParams, VPRemap, gs, gs_sample, step_values
from golden_cases import GOLDEN_DIR, load_case, model_for

GS_DIR = GOLDEN_DIR / "gs"
CASES = sorted(GS_DIR.glob("gs-*.npz")) if GS_DIR.is_dir() else []
if not CASES:
    pytest.skip(f"no GS golden cases: {GS_DIR} is missing or empty", allow_module_level=True)
IDS = [p.stem for p in CASES]


class NetRange(torch.nn.Module):
    """The mixture's exact denoiser advertising another sigma range (the cases' ``net_range``: edm or the paper's VP
    checkpoints); records the sigmas and input scalings it receives."""

    def __init__(self, inner, sigma_min: float, sigma_max: float):
        super().__init__()
        self.inner, self.sigma_min, self.sigma_max = inner, sigma_min, sigma_max
        self.sigmas: list[float] = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(float(sigma))
        return self.inner(x, sigma, class_labels)


def config_for(case: dict) -> GSConfig:
    return GSConfig(steps=int(case["steps"]), order=int(case["order"]), theory=bool(case["use_theory_coef"]),
                    t_eps=float(case["t_eps"]), net_sigma_min=float(case["net_sigma_min"]),
                    net_sigma_max=float(case["net_sigma_max"]))


def params_for(case: dict) -> GSParams:
    return GSParams.from_tensors(config_for(case), {"mu_logit": torch.from_numpy(case["param_mu_logit"]),
                                                    "t_couple": torch.from_numpy(case["param_t_couple"]),
                                                    "c_diff": torch.from_numpy(case["param_c_diff"]),
                                                    "a_diff": torch.from_numpy(case["param_a_diff"])})


def run(case: dict, params: GSParams | None = None):
    params = params or params_for(case)
    net = NetRange(model_for(case), float(case["net_sigma_min"]), float(case["net_sigma_max"]))
    with torch.no_grad():
        res = gs_sample(net, torch.from_numpy(case["noise"]), params, return_trajectory=True, return_x0=True)
    return res, net


def close(got, want, tol_rel: float, name: str):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    err = float(np.abs(got - want).max()) if got.size else 0.0
    tol = tol_rel * (1 + float(np.abs(want).max())) if want.size else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3e} > tolerance {tol:.3e}"


def rel(got, want, name: str, tol: float = 1e-12):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=tol, atol=0, err_msg=name)


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_schedule_and_initialisation(path):
    """VP re-mapping, the grid from the stored logits, the initial logits (inverse of the time-uniform grid) and the
    S4S initial coefficients (or zeros in theory mode)."""
    case = load_case(path)
    remap = VPRemap.for_net(float(case["net_sigma_min"]), float(case["net_sigma_max"]), float(case["t_eps"]))
    for ours, theirs in ((remap.beta_d, "vp_beta_d"), (remap.beta_min, "vp_beta_min"), (remap.sigma_lo, "sigma_min"),
                         (remap.sigma_hi, "sigma_max")):
        rel(ours, case[theirs], theirs)
    p = params_for(case)
    t = p.timesteps().detach()
    rel(t.numpy(), case["timesteps"], "timesteps")
    rel(remap.sigma(t).numpy(), case["sigmas"], "sigmas")
    rel(remap.alpha(t).numpy(), case["alphas"], "alphas")
    rel(remap.std(t).numpy(), case["stds"], "stds")
    rel(remap.lam(t).numpy(), case["lambdas"], "lambdas")
    rel(p.model_times().detach().numpy(), case["model_times"], "model_times")
    rel(p.model_sigmas().numpy(), case["model_sigmas"], "model_sigmas")
    init = GSParams.reference_init(config_for(case))
    rel(init.mu_logit.detach().numpy(), case["init_mu_logit"], "init_mu_logit")
    close(init.c_diff.detach().numpy(), case["init_c_diff"], 1e-10, "init_c_diff")
    assert not init.t_couple.detach().any() and not init.a_diff.detach().any()
    # the perturbed cases are init + the stored perturbations
    np.testing.assert_array_equal(case["param_mu_logit"], case["init_mu_logit"] + case["perturb_mu_logit"])


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_case(path):
    """Trajectory, data predictions, the sigma and input scale each call received, every step's calc_vals and linear
    update, NFE and orders."""
    case = load_case(path)
    res, net = run(case)
    close(res.trajectory.numpy(), case["trajectory"], 1e-8, "trajectory")
    close(res.x.numpy(), case["expected"], 1e-8, "expected")
    close(res.x0_pred.numpy(), case["x0_pred"], 1e-8, "x0_pred")
    assert res.nfe == int(case["nfe"]) == len(net.sigmas) == int(case["steps"])
    rel(net.sigmas, case["net_sigmas"], "net_sigmas")
    p = params_for(case)
    rel((1 / p.remap.edm_scale(p.model_times())).detach().numpy(), case["net_input_scale"], "net_input_scale")
    N, order = int(case["steps"]), int(case["order"])
    state, model, vals = np.zeros((N, order)), np.zeros((N, order)), []
    for k, ((cs, cm), v) in enumerate(zip(res.coefficients, res.values)):
        state[k, :len(cs)] = [float(w.detach()) for w in cs]
        model[k, :len(cm)] = [float(w.detach()) for w in cm]
        vals.append(v.row())
    close(state, case["coef_state"], 1e-10, "coef_state")
    close(model, case["coef_model"], 1e-10, "coef_model")
    want = case["calc_vals"]
    assert np.array_equal(np.isnan(vals), np.isnan(want)), "calc_vals: which entries are computed"
    close(np.nan_to_num(vals), np.nan_to_num(want), 1e-10, "calc_vals")
    np.testing.assert_array_equal([min(k + 1, order) for k in range(N)], case["cur_order"])


@pytest.mark.parametrize("path", CASES[:8], ids=IDS[:8])
def test_table_form_matches(path):
    """The shared solver signature (EDM state at sigmas[0]; the method table's ``gs``) gives the same samples."""
    case = load_case(path)
    p = params_for(case)
    one = torch.ones((), dtype=torch.float64)
    x = torch.from_numpy(case["noise"]) / p.remap.alpha(one)
    with torch.no_grad():
        res = gs(model_for(case), x, p.sigmas(), policy=p, return_trajectory=True)
    close(res.x.numpy(), case["expected"], 1e-8, "expected")
    assert res.nfe == int(case["steps"])
    with pytest.raises(ValueError, match="learned grid"):
        gs(model_for(case), x, p.sigmas() * 1.01, policy=p)
    with pytest.raises(ValueError, match="analytical first step"):
        gs(model_for(case), x, None, policy=p, afs=True)


# -- the quirks' fixes: each departs from the reference only where asked -------------------------------------------

def _case(name: str) -> dict:
    return load_case(next(p for p in CASES if name in p.stem))


def test_output_edm_divides_by_alpha():
    case = _case("013-n6-o6-theory-pert")
    p = GSParams.from_tensors(GSConfig(**{**config_for(case).to_dict(), "output": "edm"}),
                              {k: getattr(params_for(case), k).detach() for k in GSParams.TENSORS})
    res, _ = run(case, p)
    alpha_end = float(case["alphas"][-1])
    close(res.x.numpy(), case["expected"] / alpha_end, 1e-8, "edm output")
    close(res.trajectory.numpy(), case["trajectory"] / case["alphas"].reshape(-1, 1, 1, 1, 1), 1e-8, "edm trajectory")


def test_s4s_once_is_dpm_solver_pp_at_init():
    """At init the S4S mode with the reference's doubled ratio is not DPM-Solver++ (samples near zero); with
    s4s_rescale="once" it equals the theory mode at init (multistep DPM-Solver++(3M) on the same grid)."""
    s4s, theory = _case("010-n5-o5-s4s-init"), _case("008-n5-o5-theory-init")
    assert float(np.abs(s4s["expected"]).mean()) < 0.2 < float(np.abs(theory["expected"]).mean())
    once = GSConfig(**{**config_for(s4s).to_dict(), "s4s_rescale": "once"})
    dpmpp = GSConfig(**{**config_for(s4s).to_dict(), "theory": True})  # the theory mode at init (case 008 pins it)
    res, _ = run(s4s, GSParams.reference_init(once))
    want, _ = run(s4s, GSParams.reference_init(dpmpp))
    close(res.x.numpy(), want.x.numpy(), 1e-10, "S4S once at init vs DPM-Solver++")


def test_negative_offsets_nan_unless_clipped():
    """t' = t_k + t_couple_k in (-2 beta_min / beta_d, 0) makes sigma(t')^2 < 0: NaN, as the reference (ran);
    clip_model_time clamps t' to [t_eps, 1]."""
    case = _case("004-n4-o4-theory-init")
    tensors = {k: getattr(params_for(case), k).detach().clone() for k in GSParams.TENSORS}
    tensors["t_couple"][-1] = -float(case["timesteps"][-2]) - 0.002  # the last call at t' = -0.002
    ref, _ = run(case, GSParams.from_tensors(config_for(case), tensors))
    assert torch.isnan(ref.x).all()
    cfg = GSConfig(**{**config_for(case).to_dict(), "clip_model_time": True})
    fixed, net = run(case, GSParams.from_tensors(cfg, tensors))
    assert torch.isfinite(fixed.x).all() and net.sigmas[-1] == pytest.approx(float(case["sigmas"][-1]), rel=1e-12)


def test_end_at_the_nets_sigma_min():
    """end="reference" stops at sigma_ref(t_eps) = 0.0105 on an EDM net (0.002, 80); end="net" at 0.002."""
    ref = VPRemap.for_net(0.002, 80.0, 1e-3)
    assert ref.sigma_lo == pytest.approx(0.010485992786706403, rel=1e-12)
    net = VPRemap.for_net(0.002, 80.0, 1e-3, end="net")
    t = torch.tensor([1e-3, 1.0], dtype=torch.float64)
    np.testing.assert_allclose(net.sigma(t).numpy(), [0.002, 80.0], rtol=1e-10)  # exp(.) - 1 of the reference
    p = GSParams.reference_init(GSConfig(steps=4, order=4, net_sigma_min=0.002, net_sigma_max=80.0, end="net"))
    assert float(p.sigmas()[-1]) == pytest.approx(0.002, rel=1e-10) and float(p.sigmas()[0]) == pytest.approx(80.0)


def test_start_edm_matches_the_teachers_start():
    p = GSParams.reference_init(GSConfig(steps=3, order=3, net_sigma_min=0.002, net_sigma_max=80.0, start="edm"))
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    one = torch.ones((), dtype=torch.float64)
    torch.testing.assert_close(p.start_state(noise) / p.remap.alpha(one), noise * 80.0, rtol=1e-12, atol=0)
    ref = GSParams.reference_init(GSConfig(steps=3, order=3, net_sigma_min=0.002, net_sigma_max=80.0))
    assert torch.equal(ref.start_state(noise), noise)
    assert float((ref.start_state(noise) / ref.remap.alpha(one) / noise).mean()) == pytest.approx(math.sqrt(1 + 6400))


def test_s4s_low_order_initialises_where_the_reference_crashes():
    """The reference's S4S constructor needs order >= 3 (AttributeError on c2_diff/c3_diff); here order 1 / 2 set the
    rows that exist: c_1 = 1 on every step (order 1), DPM-Solver++(2M) weights / C (order 2)."""
    one = GSParams.reference_init(GSConfig(steps=4, order=1, theory=False, net_sigma_min=0.002, net_sigma_max=80.0))
    assert torch.allclose(one.c_diff.detach(), torch.ones(1, 4, dtype=torch.float64))
    two = GSParams.reference_init(GSConfig(steps=4, order=2, theory=False, net_sigma_min=0.002, net_sigma_max=80.0))
    t = two.timesteps().detach()
    for k in range(1, 4):
        r0 = float(step_values(two.remap, t, k, 2).r0)
        assert float(two.c_diff[0, k].detach()) == pytest.approx(1 + 1 / (2 * r0), rel=1e-12)
        assert float(two.c_diff[1, k].detach()) == pytest.approx(-1 / (2 * r0), rel=1e-12)
