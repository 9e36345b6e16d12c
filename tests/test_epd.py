"""EPD beyond the golden cases: class labels in the batched call, denoise_to_zero, the callback, training
on the digits-gmm teacher, and the parameter files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amed_core import schedules, solvers
from amed_core.denoisers import load_teacher
from amed_core.methods.epd import (EPDParams, EPDTrainConfig, FixedEPDParams, epd, epd_files, epd_from_files, epd_ipndm,
                                   epd_nfe, epd_total_evals, load_epd, save_epd, train_epd)
from amed_core.teacher import TeacherBatch


class LabelledToy(torch.nn.Module):
    """A denoiser whose output depends on the label and on sigma per row (checks the b-major layout)."""

    shape = (1, 2, 2)

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        self.calls.append(x.shape[0])
        lab = class_labels.argmax(dim=1).to(x.dtype) if class_labels is not None else torch.zeros(x.shape[0], dtype=x.dtype)
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + 0.1 * lab.reshape(-1, 1, 1, 1)


def _params(N, K, seed=0, **kw):
    return EPDParams(N, K, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("sampler", [epd, epd_ipndm])
def test_labels_and_layout_batched_equals_loop(sampler):
    net = LabelledToy()
    B, K, N = 3, 3, 5
    labels = torch.eye(4, dtype=torch.float64)[torch.tensor([0, 2, 3])]
    x = torch.randn(B, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    t = schedules.get_schedule(N, 0.002, 80.0)
    p = _params(N, K, scale_dir=0.1, scale_time=0.2)
    a = sampler(net, x, t, policy=p, class_labels=labels, batched=True)
    assert net.calls[:2] == [B, B * K]
    b = sampler(net, x, t, policy=p, class_labels=labels, batched=False)
    assert float((a.x - b.x).detach().abs().max()) < 1e-12
    assert a.nfe == b.nfe == epd_total_evals(N, K) and a.paper_nfe == b.paper_nfe == epd_nfe(N)
    assert (a.net_calls, b.net_calls) == (epd_nfe(N), epd_total_evals(N, K))


def test_denoise_to_zero_trajectory_and_callback():
    net = LabelledToy()
    N, K = 4, 2
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = schedules.get_schedule(N, 0.002, 80.0)
    seen = []
    r = epd(net, x * 80, t, policy=_params(N, K), afs=True, denoise_to_zero=True, return_trajectory=True,
            callback=seen.append)
    assert r.trajectory.shape == (N + 1, *x.shape)
    assert r.nfe == epd_total_evals(N, K, afs=True, denoise_to_zero=True) == (N - 1) * (K + 1) - 1 + 1
    assert r.paper_nfe == epd_nfe(N, afs=True, denoise_to_zero=True)
    assert [s.i for s in seen] == [0, 1, 2] and seen[0].denoised is None and seen[1].denoised is not None
    assert seen[-1].nfe == r.nfe - 1


def test_parameter_checks():
    t = schedules.get_schedule(4, 0.002, 80.0)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_steps"):
        epd(LabelledToy(), x, t, policy=_params(5, 2))
    with pytest.raises(ValueError, match="policy="):
        epd(LabelledToy(), x, t, policy=None)
    with pytest.raises(ValueError, match="max_order"):
        epd_ipndm(LabelledToy(), x, t, policy=_params(4, 2), max_order=5)
    with pytest.raises(ValueError):
        EPDParams(4, 2, scale_dir=-1)
    with pytest.raises(ValueError):
        FixedEPDParams([[0.5]], [[1.0, 0.0]])
    p = _params(4, 3, fcn=True, scale_dir=0.1)
    tab = p.tables()
    assert torch.allclose(tab["weight"].sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.all(tab["scale_dir"][-1] == 1) and torch.all(tab["scale_time"] == 1)
    assert torch.all((tab["scale_dir"][:-1] > 0.9) & (tab["scale_dir"][:-1] < 1.1))


def _teacher_batches(net, t, n_batches, B, seed, M=3):
    fine = schedules.refine(t, M)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        noise = torch.randn(B, *net.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            res = solvers.heun(net, noise * fine[0], fine, return_trajectory=True)
        out.append(TeacherBatch(noise=noise, class_labels=None, states=res.trajectory[:: M + 1].clone()))
    return out


def _final_error(net, params, batch, t, **opts):
    with torch.no_grad():
        sampler = epd_ipndm if "max_order" in opts else epd
        r = sampler(net, batch.states[0], t, policy=params, **opts)
    return float(((r.x - batch.states[-1]) ** 2).sum() / r.x.shape[0])


@pytest.mark.parametrize("solver", ["epd", "epd+ipndm"])
def test_train_epd_loss_falls_on_digits_gmm(solver):
    net = load_teacher("digits-gmm")
    t = schedules.get_schedule(4, 0.002, 80.0, schedule_type="time_uniform", schedule_rho=1.0)
    train = _teacher_batches(net, t, 12, 32, seed=0)
    held_out = _teacher_batches(net, t, 1, 64, seed=99)[0]
    cfg = EPDTrainConfig(solver=solver, num_points=2, scale_dir=0.05, scale_time=0.05, afs=True, max_order=3, lr=5e-2, seed=0)
    before = _params(4, 2, seed=0, scale_dir=0.05, scale_time=0.05)
    err0 = _final_error(net, before, held_out, t, **cfg.sampler_options())
    progress = []
    res = train_epd(net, t, train, cfg, callback=progress.append)
    assert res.updates == 12 * 3 == len(progress) and res.trajectories == 12 * 32
    err1 = _final_error(net, res.params, held_out, t, **cfg.sampler_options())
    first = np.mean([l[-1] for l in res.losses[:3]])
    last = np.mean([l[-1] for l in res.losses[-3:]])
    assert last < 0.8 * first, (first, last)
    assert err1 < 0.8 * err0, (err0, err1)


def test_files_round_trip(tmp_path):
    p = _params(5, 3, seed=3, scale_dir=0.05, scale_time=0.1, fcn=True)
    files = epd_files(p, {"solver": "epd", "afs": True})
    assert files == epd_files(p, {"solver": "epd", "afs": True})  # bytes reproducible
    q, info = epd_from_files(files)
    assert info == {"solver": "epd", "afs": True} and q.config() == p.config()
    for name in EPDParams.TABLES:
        assert torch.equal(getattr(p, name), getattr(q, name))
    save_epd(tmp_path / "ck", p, {"solver": "epd"})
    r, info = load_epd(tmp_path / "ck")
    assert info == {"solver": "epd"} and all(torch.equal(p.tables()[k], r.tables()[k]) for k in p.tables())
    bad = dict(files)
    bad["epd.json"] = b'{"format": "other"}'
    with pytest.raises(ValueError, match="not an EPD"):
        epd_from_files(bad)


def test_amed_policy_is_refused():
    from amed_core.amed.predictor import FixedPolicy

    t = schedules.get_schedule(3, 0.002, 80.0)
    with pytest.raises(ValueError, match="EPDCoefficients"):
        epd(LabelledToy(), torch.ones(1, 1, 2, 2, dtype=torch.float64), t, policy=FixedPolicy([0.5, 0.5]))
