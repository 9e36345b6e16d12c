"""Defaults that fit any model (issue 21, item 5): dynamic thresholding chosen from the teacher's data range (declared
or measured) in the panel, the teacher solver, the base solvers and AMED-Plugin on DPM-Solver++; ``feature_layout="auto"``
refuses ambiguous token layouts; ``VPTime`` validates its parameters (beta_d = 0 gave NaN); ``~`` / ``$VARS`` expanded in
a ``py:`` teacher's options. Each test failed on the code before this change."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from amed_core.adapters import VPTime, expand_paths, load_teacher, pool_feature_map


# -- VPTime ----------------------------------------------------------------------------------------------------------

def test_vptime_constant_beta_is_finite_and_inverts():
    vp = VPTime(beta_min=0.1, beta_d=0.0)
    s = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    t = vp.t(s)
    assert torch.isfinite(t).all()  # was 0/0 = NaN
    torch.testing.assert_close(t, torch.log1p(s ** 2) / 0.1)
    torch.testing.assert_close(vp.sigma(t), s)
    usual = VPTime()  # the rationalised inverse equals the usual formula where both are defined
    ref = (torch.sqrt(usual.beta_min ** 2 + 2 * usual.beta_d * torch.log1p(s ** 2)) - usual.beta_min) / usual.beta_d
    torch.testing.assert_close(usual.t(s), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs, match", [({"beta_min": 0.0, "beta_d": 0.0}, "both 0"),
                                            ({"beta_min": -0.1}, "beta_min >= 0"),
                                            ({"beta_d": -1.0}, "beta_d >= 0"),
                                            ({"beta_d": float("nan")}, "beta_d must be a finite"),
                                            ({"time_scale": 0.0}, "time_scale must be positive")])
def test_vptime_refuses_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VPTime(**kwargs)


# -- feature_layout ----------------------------------------------------------------------------------------------------

def test_auto_layout_refuses_ambiguous_tokens():
    x = torch.randn(2, 64, 16)  # 64 tokens x 16 channels, or 16 tokens x 64 channels: both square
    with pytest.raises(ValueError, match="feature_layout='btc'"):
        pool_feature_map(x, "blocks.1")
    a, b = pool_feature_map(x, "blocks.1", "btc"), pool_feature_map(x, "blocks.1", "bct")
    assert a.shape == b.shape == (2, 8, 8) and not torch.equal(a, b)
    assert pool_feature_map(torch.randn(2, 64, 48), "blocks.1").shape == (2, 8, 8)  # 48 is not square: unambiguous


# -- py: teacher options -----------------------------------------------------------------------------------------------

def test_py_teacher_options_expand_home_and_variables(tmp_path, monkeypatch):
    (tmp_path / "optmodel.py").write_text(
        "from amed_core.adapters import wrap_model\n"
        "import torch\n"
        "SEEN = {}\n"
        "def build(weights=None, tag='x'):\n"
        "    SEEN['weights'], SEEN['tag'] = weights, tag\n"
        "    return wrap_model(torch.nn.Identity(), parameterization='x0', sigma_min=0.01, sigma_max=10.0,\n"
        "                      shape=(1, 8, 8), identity='opt@v1')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AMED_TEST_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_teacher("py:optmodel:build", weights="$AMED_TEST_MODELS/net.safetensors", tag="costs $5")
    seen = sys.modules["optmodel"].SEEN
    assert seen == {"weights": str(tmp_path / "models" / "net.safetensors"), "tag": "costs $5"}
    spec, opts = expand_paths("py:optmodel:build", {"weights": "~/net.safetensors", "tag": "plain"})
    assert opts == {"weights": str(tmp_path / "home" / "net.safetensors"), "tag": "plain"}
    with pytest.raises(ValueError, match="options.weights: environment variable AMED_TEST_UNSET"):
        expand_paths("py:optmodel:build", {"weights": "$AMED_TEST_UNSET/x"})


# -- thresholding from the data range ------------------------------------------------------------------------------

def test_default_thresholding_follows_the_data_range():
    from amed_core.data_range import default_thresholding, thresholding_options

    assert default_thresholding((-1.0, 1.0)) and not default_thresholding((-3.0, 3.0))
    assert not default_thresholding(None)  # unknown: off
    assert default_thresholding((-1.03, 1.02), "measured") and not default_thresholding((-1.03, 1.02), "declared")
    assert thresholding_options("dpmpp", {}, (-3, 3)) == {"dynamic_thresholding": False}
    assert thresholding_options("dpmpp", {}, (-1, 1)) == {"dynamic_thresholding": True}
    assert thresholding_options("dpmpp", {"predict_x0": False}, (-1, 1))["dynamic_thresholding"] is False
    assert thresholding_options("dpmpp", {"dynamic_thresholding": True}, (-3, 3)) == {"dynamic_thresholding": True}
    assert thresholding_options("heun", {}, (-3, 3)) == {}  # takes no such option


def _wide_mixture(tmp_path, scale: float) -> str:
    d = np.load(load_teacher.__globals__["_data_path"]("digits.npz"))
    path = tmp_path / f"wide{scale:g}.npz"
    np.savez(path, weights=d["weights"], means=d["means"] * scale, covs=d["covs"] * scale ** 2, shape=d["shape"])
    return str(path)


def test_measured_range_of_a_wide_mixture(tmp_path):
    from amed_core.data_range import measure_data_range

    wide = load_teacher(f"gmm:{_wide_mixture(tmp_path, 3.0)}")
    assert wide.data_range is None  # not declared
    lo, hi = measure_data_range(wide, num_samples=16)
    exact = wide.sample(4096, torch.Generator().manual_seed(0)).reshape(-1)
    q = torch.quantile(exact, torch.tensor([0.005, 0.995], dtype=torch.float64))
    assert lo < -2 and hi > 2 and abs(lo - float(q[0])) < 0.6 and abs(hi - float(q[1])) < 0.6
    assert load_teacher("digits-gmm").data_range == (-1.0, 1.0)  # declared


def test_sweep_thresholds_only_data_inside_unit_range(tmp_path):
    """The panel's DPM-Solver++ / UniPC entries, a DPM-Solver++ teacher, AMED-Plugin on DPM-Solver++ and its base
    solver threshold on digits-gmm (declared [-1, 1]) and do not on a mixture whose data span about [-3, 3]
    (measured) or one that declares [-3, 3]; a user's explicit setting is kept."""
    from amed_core.teacher import TeacherSpec
    from flows.config import load_sweep
    from flows.plan import plan_sweep

    wide = _wide_mixture(tmp_path, 3.0)
    datasets = [{"name": "unit", "teacher": "digits-gmm"}, {"name": "measured", "teacher": f"gmm:{wide}"},
                {"name": "declared", "teacher": f"gmm:{wide}", "options": {"data_range": [-3, 3]}}]
    cfg = load_sweep({"name": "thr", "datasets": datasets, "solvers": ["amed+dpmpp"], "nfes": [5],
                      "store_url": str(tmp_path / "store"), "register_models": False,
                      "teacher": {"solver": "dpmpp", "num_trajectories": 128}, "init": {"mode": "recipe"},
                      "panel": {"entries": [{"solver": "dpmpp"}, {"solver": "unipc"},
                                            {"solver": "dpmpp", "options": {"dynamic_thresholding": True}}],
                                "expand": []}})
    plan = plan_sweep(cfg)
    jobs = {b.id: b for b in plan.baselines}
    for name, want in (("unit", True), ("measured", False), ("declared", False)):
        slot = plan.panel_for(name, 5)
        entries = [jobs[i] for i in slot.entries]
        free = [e.solver_options["dynamic_thresholding"] for e in entries if e.solver in ("dpmpp", "unipc")]
        assert len(free) >= 3 and sorted(free) == sorted([want] * (len(free) - 1) + [True]), (name, free)  # explicit kept
        teacher = next(t for t in plan.teachers if t.name == name and t.role == "students")
        assert TeacherSpec.from_json(teacher.spec_json).solver_options["dynamic_thresholding"] is want, name
        cand = next(c for c in plan.candidates if c.train.dataset.name == name)
        assert cand.train.sampler_spec["dynamic_thresholding"] is want, name
        assert jobs[cand.base_id].solver_options["dynamic_thresholding"] is want, name
