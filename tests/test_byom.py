"""Bring your own model (README "Bring your own model"): wrap_model's conversions against the exact mixture, the
public helpers and their errors, the README's score-parameterized VP-time network (taken from README.md) trained
with its own train(); models of any channel count; a missing weights file failing before any work. The README's
steps themselves (distill, fetch, sample, refuse another model) run in tests/test_readme.py (check "byom")."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amed_core.adapters import VPTime, content_sha256, load_teacher, pool_feature_map, wrap_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gmm():
    return load_teacher("digits-gmm")


def _vp_inputs(gmm, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0, 70.0], dtype=torch.float64)[:n]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x, sigma


@pytest.mark.parametrize("param", ["x0", "eps", "v", "score"])
def test_parameterizations_reproduce_the_exact_denoiser(gmm, param):
    """Each model convention, written from the exact mixture in VP time, wraps back into the same EDM denoiser."""
    vp = VPTime()

    def model(x_in, t):  # the mixture in the model's own convention: VP inputs and time
        s = vp.sigma(t).reshape(-1, 1, 1, 1)
        a, std = torch.rsqrt(1 + s ** 2), s * torch.rsqrt(1 + s ** 2)
        x = x_in / a
        x0 = gmm(x, s.reshape(-1))
        eps = (x - x0) / s
        return {"x0": x0, "eps": eps, "v": a * eps - std * x0, "score": -eps / std}[param]

    den = wrap_model(model, parameterization=param, vp=vp, sigma_min=0.002, sigma_max=80.0, shape=gmm.shape,
                     identity="gmm-in-vp@v1")
    x, sigma = _vp_inputs(gmm)
    torch.testing.assert_close(den(x, sigma), gmm(x, sigma), rtol=1e-7, atol=1e-7)
    with den.capture_features() as tap:
        den(x, sigma)
    assert tap.value.shape == (x.shape[0], 8, 8)
    assert den.identity()["name"] == "gmm-in-vp@v1" and den.identity()["adapter"] == "custom"


def test_helpers_and_errors_name_the_layer():
    # (B, C, H, W), (B, T, C) and (B, C, T) tokens, flat vectors
    assert pool_feature_map(torch.randn(2, 5, 16, 16)).shape == (2, 8, 8)
    tok = torch.randn(2, 64, 7)
    torch.testing.assert_close(pool_feature_map(tok), pool_feature_map(tok.transpose(1, 2).contiguous()))
    assert pool_feature_map(torch.randn(3, 64)).shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"feature_module 'blocks.2' gives features of shape \(4, 10, 7\)"):
        pool_feature_map(torch.randn(4, 10, 7), "feature_module 'blocks.2'")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 8)  # (B, 8): not a map

        def forward(self, x, t):
            self.proj(x.flatten(1))
            return x

    net = Net()
    den = wrap_model(net, sigma_min=0.01, sigma_max=10.0, shape=(1, 8, 8), feature_module="proj", identity="n@1")
    with pytest.raises(ValueError, match="feature_module 'proj' gives flat features of size 8"):
        with den.capture_features():
            den(torch.randn(4, 1, 8, 8), 1.0)
    with pytest.raises(ValueError, match="feature_module 'nope' is not a module of Net"):
        wrap_model(net, sigma_min=0.01, sigma_max=10.0, shape=(1, 8, 8), feature_module="nope", identity="n@1")
    with pytest.raises(ValueError, match="identity must name the model"):
        wrap_model(net, sigma_min=0.01, sigma_max=10.0, shape=(1, 8, 8), identity="")
    with pytest.raises(ValueError, match="parameterization 'v' is defined on VP inputs"):
        wrap_model(net, parameterization="v", sigma_min=0.01, sigma_max=10.0, shape=(1, 8, 8), identity="n@1")
    # the content hash changes with the weights, and is what identity() records
    h = content_sha256(net)
    assert den.identity()["content_sha256"] == h
    with torch.no_grad():
        net.proj.bias.add_(1)
    assert content_sha256(net) != h and den.identity()["content_sha256"] == content_sha256(net)

    # a denoiser without identity(): a clear error, not a bare NotImplementedError
    from amed_core.amed import SamplerSpec
    from amed_core.base_denoiser import BaseDenoiser

    class NoIdentity(BaseDenoiser):
        sigma_min, sigma_max, shape = 0.01, 10.0, (1, 8, 8)

    with pytest.raises(NotImplementedError, match="wrap_model"):
        SamplerSpec.create("amed", nfe=3, denoiser=NoIdentity())
    # py: teachers: clear errors for a bad path, a non-denoiser
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        load_teacher("py:no_such_module_xyz:build")
    with pytest.raises(ValueError, match="must return a denoiser"):
        load_teacher("py:os:getcwd")


# ---------------------------------------------------------------------------------------------------------------
# The README's worked example through the whole pipeline.

def readme_module() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Bring your own model\n")
    m = re.search(r"^```python\n(# mymodels\.py.*?)^```$", text[start:], re.S | re.M)
    assert m, "README's mymodels.py block"
    return m.group(1)


def test_readme_module_trains_a_denoiser(tmp_path, gmm):
    """The README's mymodels.py: its train() writes safetensors weights, build(weights) wraps them, and the trained
    score model denoises close to the exact mixture at a moderate noise level. (tests/test_readme.py runs the README's
    own steps: these weights distilled through `amed distill`, the plugin fetched, sampling, another model refused.)"""
    import importlib.util

    (tmp_path / "mymodels.py").write_text(readme_module())
    spec = importlib.util.spec_from_file_location("mymodels", tmp_path / "mymodels.py")
    mymodels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mymodels)
    weights = tmp_path / "models" / "score-mixer.safetensors"
    mymodels.train(str(weights))
    teacher = mymodels.build(str(weights))
    assert (teacher.sigma_min, teacher.sigma_max, teacher.feature_source) == (0.02, 80.0, "custom:blocks.1")
    x, sigma = _vp_inputs(gmm)
    with torch.no_grad():
        err = (teacher(x, sigma) - gmm(x, sigma)).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert float(err[2]) < 0.5, err


# ---------------------------------------------------------------------------------------------------------------
# Issue 19, item 3: a model of any channel count gets its pictures; a missing weights file fails before any work;
# a Ray task's error is reported once.

TWO_CHANNELS = '''
import torch
from amed_core.adapters import wrap_model


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x, sigma):
        return torch.tanh(self.body(x))


def build(weights=None):
    torch.manual_seed(0)
    return wrap_model(Net(), parameterization="x0", sigma_min=0.02, sigma_max=80.0, shape=(2, 8, 8),
                      feature_module="body.0", identity="two-channel@v1")
'''


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 6])
def test_sample_grids_of_any_channel_count(tmp_path, channels):
    """The evaluate stage's grid (flows.cluster.jobs._grid_png) failed for a 2-channel model after its training:
    `samples must be (B, 1 or 3, H, W)`. C = 1 gray, 3 RGB; 2: the first channel; more: the first three (RGB)."""
    from PIL import Image

    from amed_core.evaluate import save_grid_png, shown_channels
    from flows.cluster.jobs import _grid_png

    x = torch.rand(6, channels, 8, 8) * 2 - 1
    png = Image.open(save_grid_png(x, tmp_path / "g.png", nrow=3, scale=1))
    assert png.mode == ("L" if channels in (1, 2) else "RGB") and png.size == (3 * 9 + 1, 2 * 9 + 1)
    assert tuple(shown_channels(x).shape[1:]) == ((1 if channels in (1, 2) else 3), 8, 8)
    assert _grid_png(x)[:8] == b"\x89PNG\r\n\x1a\n"


def test_amed_sample_draws_a_two_channel_model(tmp_path):
    (tmp_path / "twoch.py").write_text(TWO_CHANNELS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--teacher", "py:twoch:build", "--solvers", "euler",
                        "--nfe", "3", "--n", "32", "--rmse-samples", "8", "--reference-steps", "20", "--out-dir",
                        str(tmp_path / "out")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_weights_of_a_py_teacher_fail_before_any_work(tmp_path):
    """The README's own sweep names /models/score-mixer.safetensors; missing, it was reported after 118 s, once Ray
    and Prefect had started (the README says bad configs fail before any work)."""
    (tmp_path / "twoch.py").write_text(TWO_CHANNELS)
    missing = tmp_path / "models" / "score-mixer.safetensors"
    sweep = tmp_path / "my-sweep.yaml"
    sweep.write_text(json.dumps({"name": "my-model", "solvers": ["amed"], "nfes": [3], "evaluation": {"metric": "rmse"}, "datasets": [
        {"name": "mine", "teacher": "py:twoch:build", "options": {"weights": str(missing)}}]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "distill", str(sweep), "--out", str(tmp_path / "run")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"options.weights: '{missing}' does not exist (teacher 'py:twoch:build' gets it as its 'weights')" \
        in r.stderr, r.stderr
    assert "Ray" not in r.stdout + r.stderr and not (tmp_path / "run").exists()  # nothing started, nothing written
    assert took < 60, took  # imports only (a few seconds on an idle machine)


def test_a_ray_task_error_is_reported_once(capsys):
    """`amed distill: error:` repeated the Ray task's whole traceback that the flow's log had just printed."""
    from ray.exceptions import RayTaskError

    from flows.cli import error_line

    err = RayTaskError("eval_job", "Traceback (most recent call last):\n  ...\nValueError: bad grid", ValueError("bad grid"))
    line = error_line(err.as_instanceof_cause())
    assert line == "ValueError: bad grid (in a Ray task; its traceback is in the log above)"
    assert error_line(ValueError("plain")) == "plain"
