"""AMED: predictor, solvers/plugins, training, checkpoints (exact Gaussian-mixture teacher, small runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from amed_core import methods
from amed_core.amed import (AMED_SOLVERS, AMEDPredictor, FixedPolicy, PredictorConfig, SamplerSpec, TrainConfig,
                            checkpoint_files, load_sampler, nfe_for, num_steps_for, sampler_from_files, save_checkpoint,
                            teacher_batches, train_amed)
from amed_core.amed.solvers import STEPS, History, make_context
from amed_core.adapters import GaussianMixtureDenoiser, load_teacher
from amed_core.schedules import ScheduleSpec

PLUGINS = sorted(AMED_SOLVERS)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


def _noise(n, shape, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Recorder:
    """A policy that records its inputs and returns constants."""

    needs_features = False

    def __init__(self, r=0.4):
        self.r, self.calls = r, []

    def __call__(self, features, t_cur, t_next, step_idx):
        self.calls.append((features.clone(), float(t_cur), float(t_next), step_idx))
        B = features.shape[0]
        return torch.full((B,), self.r, dtype=features.dtype), torch.ones(B, dtype=features.dtype), torch.ones(B, dtype=features.dtype)


# -- predictor -------------------------------------------------------------------------------------

def test_predictor_default_size_matches_reference_architecture():
    cfg = PredictorConfig()
    p = AMEDPredictor(cfg)
    tc, hd, bd, f = cfg.time_channels, cfg.hidden_dim, cfg.bottleneck_dim, cfg.feature_dim
    heads = 1 + (cfg.scale_dir > 0) + (cfg.scale_time > 0)
    expected = (tc * tc + tc) + (f * hd + hd) + (hd * bd + bd) + heads * (2 * tc + bd + 1)
    assert p.num_parameters() == expected
    assert 8_500 <= p.num_parameters() <= 9_500  # the paper's "~9k"


def test_predictor_output_ranges_and_disabled_heads():
    feats = 5 * torch.randn(64, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = AMEDPredictor(PredictorConfig(scale_dir=0.05, scale_time=0.2), seed=3)
    with torch.no_grad():
        r, sd, st = p(feats, torch.tensor(80.0), torch.tensor(10.0))
    assert r.shape == sd.shape == st.shape == (64,)
    assert torch.all((r > 0) & (r < 1)) and float(r.std()) > 0
    assert torch.all((sd >= 0.95) & (sd <= 1.05)) and torch.all((st >= 0.8) & (st <= 1.2))
    q = AMEDPredictor(PredictorConfig(scale_dir=0.0, scale_time=0.0))
    _, sd, st = q(feats, torch.tensor(1.0), torch.tensor(0.5))
    assert torch.all(sd == 1) and torch.all(st == 1)
    with pytest.raises(ValueError, match="features"):
        q(torch.zeros(2, 4, 4), torch.tensor(1.0), torch.tensor(0.5))


# -- solvers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLUGINS)
@pytest.mark.parametrize("afs", [False, True])
def test_nfe_accounting_and_afs_features(teacher, name, afs):
    N = 4
    sigmas = ScheduleSpec().grid(N)
    rec = Recorder()
    res = methods.solve(name, teacher, _noise(3, teacher.shape) * sigmas[0], sigmas, policy=rec, afs=afs)
    assert res.nfe == 2 * (N - 1) - int(afs) == nfe_for(name, N, afs)
    assert num_steps_for(name, res.nfe, afs) == N
    assert [c[3] for c in rec.calls] == list(range(N - 1))  # the predictor is not an NFE: once per step
    first, second = rec.calls[0][0], rec.calls[1][0]
    assert first.shape == (3, 8, 8)
    assert bool(torch.all(first == 0)) == afs
    assert float(second.abs().max()) > 0
    assert torch.isfinite(res.x).all()


def test_feature_stand_in_is_denoised_channel_mean(teacher):
    sigmas = ScheduleSpec().grid(3)
    x = _noise(2, teacher.shape) * sigmas[0]
    rec = Recorder()
    methods.solve("amed", teacher, x, sigmas, policy=rec)
    expected = teacher(x, sigmas[0]).mean(dim=1)
    torch.testing.assert_close(rec.calls[0][0], expected)


def test_fixed_policy_r_one_is_heun_like_euler_plugin(teacher):
    # amed+euler with r = 1 and unit scales evaluates at t_next after a full Euler step: plain Euler on the same grid
    # for the first sub-step, then a zero-length second step.
    sigmas = ScheduleSpec().grid(5)
    x = _noise(4, teacher.shape) * sigmas[0]
    a = methods.solve("amed+euler", teacher, x, sigmas, policy=FixedPolicy([1.0] * 4))
    b = methods.solve("euler", teacher, x, sigmas)
    torch.testing.assert_close(a.x, b.x)


def test_afs_out_of_history_makes_the_first_ipndm_step_an_euler_plugin_step(teacher):
    sigmas = ScheduleSpec().grid(4)
    x = _noise(4, teacher.shape) * sigmas[0]
    pol = FixedPolicy([0.3, 0.6, 0.4], [1.01, 0.99, 1.0], [1.1, 0.9, 1.0])
    run = lambda name, **kw: methods.solve(name, teacher, x, sigmas, policy=pol, afs=True, return_trajectory=True, **kw)
    ref, out, eul = run("amed+ipndm"), run("amed+ipndm", afs_in_history=False), run("amed+euler")
    torch.testing.assert_close(out.trajectory[1], eul.trajectory[1])  # history empty after AFS: order 1 twice
    assert not torch.allclose(ref.trajectory[1], out.trajectory[1])   # the reference extrapolates from the AFS d
    assert out.nfe == ref.nfe == 5
    # amed+dpmpp runs with the shorter history (orders capped by what it holds)
    d = methods.solve("amed+dpmpp", teacher, x, ScheduleSpec("logsnr").grid(6), policy=FixedPolicy([0.5] * 5), afs=True,
                      afs_in_history=False)
    assert d.nfe == 9 and torch.isfinite(d.x).all()
    # without AFS the option changes nothing
    a = methods.solve("amed+dpmpp", teacher, x, sigmas, policy=pol, afs_in_history=False)
    b = methods.solve("amed+dpmpp", teacher, x, sigmas, policy=pol)
    assert torch.equal(a.x, b.x)


def test_bad_options_raise_value_error(teacher):
    sigmas = ScheduleSpec().grid(3)
    x = _noise(1, teacher.shape) * sigmas[0]
    pol = FixedPolicy([0.5, 0.5])
    with pytest.raises(ValueError, match="policy"):
        methods.solve("amed", teacher, x, sigmas, policy=None)
    with pytest.raises(ValueError, match="max_order"):
        methods.solve("amed+ipndm", teacher, x, sigmas, policy=pol, max_order=5)
    with pytest.raises(ValueError, match="max_order"):
        methods.solve("amed+dpmpp", teacher, x, sigmas, policy=pol, max_order=4)
    with pytest.raises(ValueError, match="dynamic_thresholding"):
        methods.solve("amed+dpmpp", teacher, x, sigmas, policy=pol, predict_x0=False, dynamic_thresholding=True)
    with pytest.raises(ValueError, match="no option"):
        methods.solve("amed", teacher, x, sigmas, policy=pol, max_order=2)
    with pytest.raises(ValueError, match="steps"):
        methods.solve("amed", teacher, x, ScheduleSpec().grid(5), policy=pol)
    with pytest.raises(ValueError, match="afs_in_history"):
        SamplerSpec.create("amed", 5, afs_in_history=False)
    with pytest.raises(ValueError, match="scale_dir"):
        PredictorConfig(scale_dir=1.5)
    with pytest.raises(ValueError, match="restart"):
        TrainConfig(restart="sometimes")
    with pytest.raises(ValueError, match="teacher_solver"):
        TrainConfig(teacher_solver="rk45")
    with pytest.raises(ValueError, match="afs"):
        num_steps_for("amed", 5, afs=False)
    with pytest.raises(ValueError, match="nfe"):
        SamplerSpec(solver="amed", nfe=6, num_steps=4, afs=True)
    with pytest.raises(ValueError, match="solver"):
        SamplerSpec.create("amed+lms", 5)


def test_gradients_reach_every_predictor_parameter(teacher):
    spec = SamplerSpec.create("amed+dpm", 5, predictor=PredictorConfig(scale_dir=0.05, scale_time=0.1), denoiser=teacher)
    p = AMEDPredictor(spec.predictor)
    x = _noise(8, teacher.shape) * spec.grid()[0]
    ctx = make_context(spec.solver, teacher, x, spec.grid(), policy=p, afs=True)
    out0 = STEPS[spec.solver](ctx, x, 0, History())
    out1 = STEPS[spec.solver](ctx, out0.x.detach(), 1, out0.history)  # step 1 uses real features
    (out1.x ** 2).sum().backward()
    for name, prm in p.named_parameters():
        assert prm.grad is not None and float(prm.grad.abs().sum()) > 0, name


# -- training --------------------------------------------------------------------------------------

TINY = dict(num_trajectories=48, batch_size=16)


def test_training_decreases_loss(teacher):
    spec = SamplerSpec.create("amed", 3, denoiser=teacher)
    res = train_amed(teacher, spec, TrainConfig(num_trajectories=128, batch_size=32, lr=2e-2))
    losses = np.array(res.losses)  # (batches, steps)
    assert losses.shape == (4, spec.num_steps - 1)
    assert losses[-1].sum() < 0.8 * losses[0].sum()
    assert res.updates == 4 * (spec.num_steps - 1) and res.trajectories == 128


def test_training_is_deterministic_and_teacher_is_pluggable(teacher):
    spec = SamplerSpec.create("amed+ipndm", 3, denoiser=teacher)  # multistep: continues from its own output
    cfg = TrainConfig(**TINY, seed=7)
    seen = []
    a = train_amed(teacher, spec, cfg, callback=seen.append)
    b = train_amed(teacher, spec, cfg, batches=list(teacher_batches(teacher, spec, cfg)))  # stored-teacher path
    c = train_amed(teacher, spec, TrainConfig(**TINY, seed=8))
    for k, v in a.predictor.state_dict().items():
        assert torch.equal(v, b.predictor.state_dict()[k]), k
    assert any(not torch.equal(v, c.predictor.state_dict()[k]) for k, v in a.predictor.state_dict().items())
    assert len(seen) == a.updates and seen[-1].trajectories == 48
    assert all(0 < s.r_mean < 1 and np.isfinite(s.loss) for s in seen)


def test_train_config_json_round_trip():
    cfg = TrainConfig(num_trajectories=5, teacher_solver="heun", teacher_M=3, restart="own")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1})


# -- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_round_trip_samples_identically(teacher, tmp_path):
    sched = ScheduleSpec("logsnr", rho=1.0)
    spec = SamplerSpec.create("amed+dpmpp", 5, schedule=sched, predictor=PredictorConfig(scale_time=0.2), denoiser=teacher)
    res = train_amed(teacher, spec, TrainConfig(num_trajectories=32, batch_size=16))
    save_checkpoint(tmp_path / "ckpt", res.predictor, spec)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["predictor.safetensors", "sampler.json"]
    loaded = load_sampler(tmp_path / "ckpt")
    assert loaded.spec == spec
    noise = _noise(16, teacher.shape, seed=5)
    from amed_core.amed import Sampler
    direct = Sampler(spec, res.predictor)(teacher, noise)
    again = loaded(teacher, noise)
    assert torch.equal(direct.x, again.x) and again.nfe == spec.nfe == 5
    # bytes API (what stores and registries keep) gives the same sampler
    files = checkpoint_files(res.predictor, spec)
    assert torch.equal(sampler_from_files(files)(teacher, noise).x, direct.x)
    # a spec whose predictor config disagrees with the weights is refused
    bad = json.loads(files["sampler.json"])
    bad["predictor"]["hidden_dim"] = 64
    with pytest.raises(ValueError, match="predictor"):
        sampler_from_files({**files, "sampler.json": json.dumps(bad).encode()})
    with pytest.raises(ValueError, match="checkpoint"):
        load_sampler(tmp_path)


def test_checkpoint_bytes_are_reproducible(teacher, tmp_path):
    """Equal weights and spec give equal checkpoint bytes, in this process and in another one (the store and the
    registry compare checkpoints by their SHA-256)."""
    import subprocess
    import sys

    spec = SamplerSpec.create("amed", 3, denoiser=teacher)
    pred = AMEDPredictor(spec.predictor, seed=4)
    first = checkpoint_files(pred, spec)
    assert all(checkpoint_files(pred, spec) == first for _ in range(5))
    save_checkpoint(tmp_path / "a", pred, spec)
    code = ("import sys; from amed_core.amed.checkpoint import load_sampler, checkpoint_files; s = load_sampler(sys.argv[1]); "
            "sys.stdout.buffer.write(checkpoint_files(s.predictor, s.spec)['predictor.safetensors'])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, check=True).stdout
    assert out == first["predictor.safetensors"]


def test_sampler_refuses_another_teacher(teacher):
    spec = SamplerSpec.create("amed", 3, denoiser=teacher)
    from amed_core.amed import Sampler
    sampler = Sampler(spec, AMEDPredictor(spec.predictor))
    other = GaussianMixtureDenoiser(np.ones(1), np.zeros((1, 64)), np.eye(64)[None], (1, 8, 8), name="other")
    with pytest.raises(ValueError, match="teacher"):
        sampler(other, _noise(2, teacher.shape))
    assert sampler(other, _noise(2, teacher.shape), check_teacher=False).x.shape == (2, 1, 8, 8)


def test_epochs_revisit_given_batches(teacher):
    spec = SamplerSpec.create("amed", 3, denoiser=teacher)
    cfg = TrainConfig(num_trajectories=16, batch_size=16, epochs=3)
    stored = list(teacher_batches(teacher, spec, cfg))
    res = train_amed(teacher, spec, cfg, batches=stored)
    assert res.updates == 3 * (spec.num_steps - 1) and res.trajectories == 48
    once = train_amed(teacher, spec, TrainConfig(num_trajectories=16, batch_size=16), batches=iter(stored))
    assert once.updates == spec.num_steps - 1


def test_teacher_choice_reference_and_improved(teacher):
    from amed_core.amed.train import default_teacher

    ip = SamplerSpec.create("amed+ipndm", 5, denoiser=teacher)
    assert default_teacher(ip, TrainConfig()) == ("ipndm", 2, {"max_order": 4})            # reference: own solver, M=2
    assert default_teacher(SamplerSpec.create("amed", 5), TrainConfig())[:2] == ("heun", 1)  # reference: Heun, M=1
    name, M, opts = default_teacher(ip, TrainConfig.improved("amed+ipndm"))
    assert (name, M, opts) == ("heun", 10, {})                                             # other solver: its defaults
    assert TrainConfig.improved("amed+dpm") == TrainConfig()
    with pytest.raises(ValueError, match="solver"):
        TrainConfig.improved("amed+lms")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_matches_torch_optim_adam_bit_for_bit(dtype):
    """amed_core.optim.Adam (no torch._dynamo import) against torch.optim.Adam: same parameters after 60 steps of
    random gradients, a parameter left without a gradient now and then, bit for bit."""
    from amed_core.optim import Adam

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 64), (8,), (1, 24)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Adam(ours, lr=5e-3, betas=(0.9, 0.999), eps=1e-8)
    b = torch.optim.Adam(ref, lr=5e-3, betas=(0.9, 0.999), eps=1e-8)
    for k in range(60):
        a.zero_grad(set_to_none=True)
        b.zero_grad(set_to_none=True)
        for i, (p, q) in enumerate(zip(ours, ref)):
            if (k + i) % 7 == 3:
                continue  # no gradient this step: both skip it (its step count does not advance)
            grad = torch.randn(p.shape, generator=g, dtype=dtype) * 10 ** (k % 5 - 2)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        Adam(ours, lr=-1.0)


_TRAIN_DIGITS = ("import sys, torch\nfrom amed_core.adapters import load_teacher\n"
                 "from amed_core.amed import SamplerSpec, TrainConfig, train_amed\n"
                 "t = load_teacher('digits-gmm')\nspec = SamplerSpec.create('amed', 3, denoiser=t)\n"
                 "r = train_amed(t, spec, TrainConfig(num_trajectories=16, batch_size=8))\nassert r.updates > 0\n")


def _imports_torch_dynamo(code: str) -> bool:
    """Run ``code`` in a fresh interpreter; whether it left torch._dynamo imported."""
    import subprocess
    import sys

    code += "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] != "clean"


def test_training_does_not_import_torch_dynamo():
    """A fresh process trains a predictor without importing torch._dynamo (torch.optim would: 1.6 s of CPU per new
    Ray worker on the 2-core VM, amed_core/optim.py)."""
    assert not _imports_torch_dynamo(_TRAIN_DIGITS)


def test_loading_a_checkpoint_does_not_import_torch_dynamo():
    """A fresh process trains, saves and loads a checkpoint (the size check builds the predictor on the meta device)
    without importing torch._dynamo: random initialisation on meta did, 0.9 s before the first evaluation in every
    Ray worker (seed=None: shapes only). The loaded sampler equals the saved one."""
    assert not _imports_torch_dynamo(
        _TRAIN_DIGITS + "from amed_core.amed.checkpoint import checkpoint_files, sampler_from_files\n"
        "s = sampler_from_files(checkpoint_files(r.predictor, r.spec))\n"
        "assert all(torch.equal(a, b) for a, b in zip(s.predictor.state_dict().values(),"
        " r.predictor.state_dict().values()))\n")


def test_uninitialised_predictor_has_the_same_tensors():
    from amed_core.amed.predictor import AMEDPredictor, PredictorConfig

    for cfg in (PredictorConfig(), PredictorConfig(scale_dir=0.0, scale_time=0.05)):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in AMEDPredictor(cfg, seed=None).state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in AMEDPredictor(cfg, seed=3).state_dict().items()}
