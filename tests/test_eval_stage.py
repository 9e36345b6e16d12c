"""The evaluation stage: amed_core.evaluate.score_run gives the numbers of the direct computation (per-seed
noise from trajectory_inputs, then amed_core.metrics / amed_core.fid), independent of batching; FID resumes
from partial statistics; flows.cluster.jobs.eval_job (run in-process on a local file store) scores fid from
fsspec URLs and resumes from the partial statistics it caches in the run store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fid_weights import random_state_dict
from safetensors.torch import save_file

from amed_core import metrics
from amed_core.denoisers import load_teacher
from amed_core.evaluate import FIDSetup, score_run
from amed_core.fid import FIDStats, load_inception, save_stats, to_uint8
from amed_core.schedules import ScheduleSpec
from amed_core.methods import solve
from amed_core.teacher import trajectory_inputs

SEEDS = list(range(1_000_000, 1_000_008))
SCHED = ScheduleSpec()  # EDM polynomial rho=7, sigma 80 -> 0.002
N_STEPS = 5


@pytest.fixture(scope="module")
def gmm():
    return load_teacher("digits-gmm")


def _euler(gmm):
    sigmas = SCHED.grid(N_STEPS)

    def run(noise, labels):
        return solve("euler", gmm, noise * sigmas[0], sigmas, class_labels=labels)

    return run


def _reference(gmm, steps=65):
    sigmas = SCHED.grid(steps)

    def reference(noise, labels):
        return solve("heun", gmm, noise * sigmas[0], sigmas, class_labels=labels)

    return reference


def _direct_samples(gmm, run, seeds, batch_size=None):
    """The old eval_job loop: noise from trajectory_inputs per batch, solved batch by batch."""
    batch_size = batch_size or len(seeds)
    xs, noises = [], []
    for lo in range(0, len(seeds), batch_size):
        noise, _ = trajectory_inputs(seeds[lo:lo + batch_size], gmm.shape)
        with torch.no_grad():
            xs.append(run(noise, None).x.double())
        noises.append(noise)
    return torch.cat(xs), torch.cat(noises)


def test_fd_exact_and_rmse_equal_the_direct_computation(gmm):
    run, reference = _euler(gmm), _reference(gmm)
    seeds = list(range(1_000_000, 1_000_128))
    values = {}
    for bs in (50, 128):
        x, noise = _direct_samples(gmm, run, seeds, bs)
        err2 = 0.0
        for lo in range(0, len(seeds), bs):
            with torch.no_grad():
                err2 += float(((x[lo:lo + bs] - reference(noise[lo:lo + bs], None).x.double()) ** 2).sum())
        fd = score_run(run, gmm, seeds=seeds, batch_size=bs, metric="fd_exact", keep=5)
        assert fd.value == metrics.fd_exact_gmm(x, gmm)  # same batches: bit-identical to the old loop
        assert (fd.nfe, fd.num_samples, fd.finite) == (N_STEPS - 1, 128, True)
        torch.testing.assert_close(fd.samples, x[:5], rtol=0, atol=0)
        r = score_run(run, gmm, seeds=seeds, batch_size=bs, metric="rmse", reference=reference)
        assert r.value == (err2 / x.numel()) ** 0.5
        with torch.no_grad():
            assert r.value == pytest.approx(metrics.rmse(x, reference(noise, None).x), rel=1e-9)
        assert r.samples.shape == (0, *gmm.shape)
        values[bs] = (fd.value, r.value)
    assert values[50] == pytest.approx(values[128], rel=1e-9)  # batching does not matter (up to rounding)
    assert values[50][1] > 1e-3  # 4 Euler steps are visibly off the ODE solution
    with pytest.raises(ValueError, match="reference"):
        score_run(run, gmm, seeds=SEEDS, batch_size=4, metric="rmse")
    with pytest.raises(ValueError, match="evaluation.metric"):
        score_run(run, gmm, seeds=SEEDS, batch_size=4, metric="fd")
    with pytest.raises(ValueError, match="fid=FIDSetup"):
        score_run(run, gmm, seeds=SEEDS, batch_size=4, metric="fid")


def _fid_lowrank(feats, ref_feats) -> float:
    """FID from the features themselves, without d x d matrices: with centred A = F / sqrt(n-1), B likewise,
    tr (S1 S2)^(1/2) is the nuclear norm of A B^T (n x m), so FID = |mu1-mu2|^2 + |A|_F^2 + |B|_F^2 - 2 |A B^T|_*."""
    f, g = (np.asarray(v, np.float64) for v in (feats, ref_feats))
    a = (f - f.mean(0)) / np.sqrt(len(f) - 1)
    b = (g - g.mean(0)) / np.sqrt(len(g) - 1)
    d = f.mean(0) - g.mean(0)
    return float(d @ d + (a * a).sum() + (b * b).sum() - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory, gmm):
    """Random Inception weights (safetensors), the features of 8 exact mixture samples and their
    statistics (npz) as the FID reference."""
    d = tmp_path_factory.mktemp("fid")
    save_file({k: v.contiguous() for k, v in random_state_dict().items()}, str(d / "inception.safetensors"))
    net = load_inception(d / "inception.safetensors")
    exact = gmm.sample(8, generator=torch.Generator().manual_seed(7))
    ref_feats = net(to_uint8(exact))
    ref = FIDStats.empty().update(ref_feats)
    save_stats(d / "ref.npz", ref.mu, ref.sigma)
    x, _ = _direct_samples(gmm, _euler(gmm), SEEDS)
    return {"dir": d, "net": net, "ref_feats": ref_feats, "x": x, "feats": net(to_uint8(x))}


def test_fid_matches_independent_stats_and_resumes(gmm, fid_files):
    """score_run's FID plumbing on Inception features projected to 32 dimensions (a fixed random map; a 2048 x 2048
    eigendecomposition per score would cost ~10 s here; eval_job's test below uses the full 2048 features)."""
    run, x = _euler(gmm), fid_files["x"]
    proj = torch.nn.Linear(2048, 32, bias=False).requires_grad_(False)
    torch.nn.init.normal_(proj.weight, generator=torch.Generator().manual_seed(1))
    net = torch.nn.Sequential(fid_files["net"], proj)
    feats, ref_feats = proj(fid_files["feats"]), proj(fid_files["ref_feats"])
    ref = FIDStats.empty(32).update(ref_feats)
    setup = FIDSetup(net, ref.mu, ref.sigma)
    direct = _fid_lowrank(feats, ref_feats)
    assert direct == pytest.approx(FIDStats.empty(32).update(feats).fid(ref.mu, ref.sigma), rel=1e-8)
    assert direct > 0.01

    seen = []
    one = score_run(run, gmm, seeds=SEEDS, batch_size=3, metric="fid", fid=setup, keep=4,
                    on_batch=lambda s, ok: seen.append((s.n, ok)))
    assert one.value == pytest.approx(direct, rel=1e-6)
    assert seen == [(3, True), (6, True), (8, True)] and one.finite and one.nfe == N_STEPS - 1
    torch.testing.assert_close(one.samples, x[:4], rtol=0, atol=1e-12)  # other batching: rounding only

    # interrupted after 5 samples: resume from their statistics (as persisted bytes)
    partial = FIDStats.from_bytes(FIDStats.empty(32).update(feats[:5]).to_bytes())
    seen.clear()
    res = score_run(run, gmm, seeds=SEEDS, batch_size=2, metric="fid", fid=setup, keep=4, partial=partial,
                    on_batch=lambda s, ok: seen.append((s.n, ok)))
    # Inception runs in float32, whose results differ in the last bits between batch shapes: rel 1e-6
    assert res.value == pytest.approx(one.value, rel=1e-6) and res.value == pytest.approx(direct, rel=1e-6)
    assert res.stats.n == 8
    np.testing.assert_allclose(res.stats.outer, one.stats.outer, rtol=0, atol=1e-6 * np.abs(one.stats.outer).max())
    assert seen == [(7, True), (8, True)] and partial.n == 5  # the caller's partial is not modified
    assert res.nfe == N_STEPS - 1
    torch.testing.assert_close(res.samples, x[:4], rtol=0, atol=1e-12)  # grid samples redrawn
    with pytest.raises(ValueError, match="partial FID statistics"):
        score_run(run, gmm, seeds=SEEDS[:4], batch_size=2, metric="fid", fid=setup, partial=partial)


def _base_job(**fields):
    """An evaluate job of the euler base solver on digits-gmm (flows.plan.EvalJob) with the given fields."""
    from flows.config import DatasetConfig
    from flows.plan import EvalJob

    return EvalJob.model_validate({"kind": "baseline", "torch_threads": 1, "storage_options": {},
                                   "dataset": DatasetConfig(name="digits", teacher="digits-gmm"), "solver": "euler",
                                   "num_steps": N_STEPS, "solver_options": {}, "schedule": SCHED.to_dict(),
                                   "protocol_hash": "test", **fields})


def test_eval_job_scores_fid_from_urls_and_resumes(tmp_path, gmm, fid_files):
    """eval_job with metric fid, weights and statistics read via fsspec, resuming from statistics of 6 samples that
    an interrupted run left in the store: the record holds the FID of all 8 (full 2048 Inception features)."""
    from flows.cluster.jobs import eval_job
    from flows.storage import RunStore

    store_url = f"file://{tmp_path / 'store'}"
    d = fid_files["dir"]
    job = _base_job(id="base-test", store_url=store_url, grid_samples=4, result_key="evals/test.json",
                    grid_key="evals/test-samples.png", title="test",
                    protocol={"metric": "fid", "num_samples": 8, "seed": SEEDS[0], "batch_size": 3, "reference_steps": 65,
                              "fid_stats": f"file://{d / 'ref.npz'}", "inception_weights": str(d / "inception.safetensors")})
    store = RunStore(store_url)
    bad = job.model_copy(update={"protocol": job.protocol.model_copy(
        update={"inception_weights": str(tmp_path / "missing.safetensors")})})
    with pytest.raises(ValueError, match="evaluation.inception_weights"):
        eval_job(bad)
    partial_key = "evals/test.json.fid-partial.safetensors"
    store.put(partial_key, FIDStats.empty().update(fid_files["feats"][:6]).to_bytes())
    rec = eval_job(job)
    assert rec["resumed_from"] == 6
    assert rec["value"] == pytest.approx(_fid_lowrank(fid_files["feats"], fid_files["ref_feats"]), rel=1e-6)
    assert rec["nfe"] == N_STEPS - 1 and rec["finite"] and rec["num_samples"] == 8
    assert json.loads(store.get("evals/test.json"))["value"] == rec["value"]
    assert store.get("evals/test-samples.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not store.exists(partial_key)  # removed once the record is written


def test_eval_job_fd_exact_matches_direct(tmp_path, gmm):
    from flows.cluster.jobs import eval_job

    job = _base_job(id="base-fd", store_url=str(tmp_path / "store"), grid_samples=0, result_key="evals/fd.json",
                    grid_key="evals/fd.png", title="",
                    protocol={"metric": "fd_exact", "num_samples": 8, "seed": SEEDS[0], "batch_size": 5,
                              "reference_steps": 65})
    x, _ = _direct_samples(gmm, _euler(gmm), SEEDS, 5)
    rec = eval_job(job)
    assert rec["value"] == pytest.approx(metrics.fd_exact_gmm(x, gmm), rel=1e-12)
    assert np.isfinite(rec["value"]) and rec["num_samples"] == 8
