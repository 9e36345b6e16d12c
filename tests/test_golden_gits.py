"""GITS (amed_core.methods.gits) against every reference case in $AMED_GOLDEN_DIR/gits/*.npz, plus unit tests.

Tolerances (golden README, "Tolerances"): trajectories and teacher_final 1e-8 (1 + max abs); t_steps_tea and t_steps
relative 1e-12; cost_matrix, cost_matrix_sum, teacher_dev, afs_dist 1e-9 (1 + max abs); indices, counts and every NFE
field exact.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from amed_core import schedules
from amed_core.methods import gits
from golden_cases import GOLDEN_DIR, load_case, model_for, schedule_kwargs, solver_call

GITS_DIR = GOLDEN_DIR / "gits"
GITS_CASES = sorted(GITS_DIR.glob("*.npz")) if GITS_DIR.is_dir() else []
_RESERVED = ("afs", "denoise_to_zero", "return_trajectory")


# Every case present is a test; with none, one placeholder that skips naming the folder.
CASE_PARAMS = [pytest.param(p, id=p.stem) for p in GITS_CASES] or [pytest.param(None, id="no-cases")]


def _skip_if_missing():
    if not GITS_CASES:
        pytest.skip(f"no GITS golden cases: {GITS_DIR} is missing or empty (set AMED_GOLDEN_DIR)")


# ------------------------------------------------------------------------------------------------------------------
# Helpers for the cases.

def student_call(case: dict) -> tuple[str, dict]:
    """Our student solver name and its own options (afs / denoise_to_zero / return_trajectory removed)."""
    name, opts = solver_call(case)
    return name, {k: v for k, v in opts.items() if k not in _RESERVED}


def teacher_name(case: dict) -> str:
    name, _ = solver_call(dict(case, solver=case["solver_tea"], max_order=case["max_order_tea"]))
    return name


def t_steps_tea(case: dict) -> torch.Tensor:
    return schedules.get_schedule(int(case["num_steps_tea"]), float(case["sigma_min"]), float(case["sigma_max"]),
                                  **schedule_kwargs(case))


@functools.lru_cache(maxsize=None)
def _run(path: Path):
    case = load_case(path)
    name, opts = student_call(case)
    res = gits.gits_schedule(
        model_for(case), t_steps_tea(case), int(case["num_steps"]), solver=name, solver_options=opts,
        teacher_solver=teacher_name(case), teacher_options=None,       # inherit the student's options, as the reference
        metric=str(case["metric"]), coeff=float(case["coeff"]), afs=bool(case["afs"]),
        denoise_to_zero=bool(case["denoise_to_zero"]), warmup_noise=torch.from_numpy(case["warmup_noise"]))
    return case, res


def _close(name, got, ref, atol_rel, errors):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        errors.append(f"{name}: shape {got.shape} != reference {ref.shape}")
        return
    if ref.size == 0:
        return
    err = float(np.abs(got - ref).max())
    tol = atol_rel * (1 + float(np.abs(ref).max()))
    if not err <= tol:
        errors.append(f"{name}: max abs error {err:.3e} > tolerance {tol:.3e}")


def _rel(name, got, ref, rtol, errors):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        errors.append(f"{name}: shape {got.shape} != reference {ref.shape}")
        return
    err = float((np.abs(got - ref) / np.abs(ref)).max())
    if not err <= rtol:
        errors.append(f"{name}: max relative error {err:.3e} > {rtol:.0e}")


def _exact(name, got, ref, errors):
    got = [int(v) for v in np.asarray(got).reshape(-1)]
    ref = [int(v) for v in np.asarray(ref).reshape(-1)]
    if got != ref:
        errors.append(f"{name}: {got} != reference {ref}")


# ------------------------------------------------------------------------------------------------------------------
# Golden cases.

@pytest.mark.parametrize("path", CASE_PARAMS)
def test_gits_schedule_case(path):
    """t_steps_tea, warm-up, teacher, cost matrix, DP, free-step search and the selected schedule."""
    _skip_if_missing()
    case, res = _run(path)
    errors: list[str] = []
    assert case["method"] == "gits"
    assert int(case["max_order_tea"]) == int(case["max_order"]), "the teacher inherits the student's max_order"
    _rel("t_steps_tea", res.t_steps_tea.numpy(), case["t_steps_tea"], 1e-12, errors)
    R = gits.warmup_rounds(int(case["num_warmup"]), int(case["max_batch_size"]))
    _exact("warmup_rounds (formula)", [R], [case["warmup_rounds"]], errors)
    _exact("warmup_rounds (used)", [res.warmup_rounds], [case["warmup_rounds"]], errors)
    _close("teacher_final", res.teacher_final.numpy(), case["teacher_final"], 1e-8, errors)
    if case["metric"] == "dev":
        _close("teacher_dev", res.teacher_dev.numpy(), case["teacher_dev"], 1e-9, errors)
    else:
        assert res.teacher_dev is None    # only the dev metric needs it; test_gits_cost_from_trajectories checks it
    _close("cost_matrix_sum", res.cost_matrix_sum.numpy(), case["cost_matrix_sum"], 1e-9, errors)
    _close("cost_matrix", res.cost_matrix.numpy(), case["cost_matrix"], 1e-9, errors)
    _exact("dp_phi", res.dp_phi, case["dp_phi"], errors)
    _exact("afs_candidates", res.afs_candidates, case["afs_candidates"], errors)
    _close("afs_dist", res.afs_dist, case["afs_dist"], 1e-9, errors)
    _exact("dp_list", res.dp_list, case["dp_list"], errors)
    _rel("t_steps", res.t_steps.numpy(), case["t_steps"], 1e-12, errors)
    _exact("nfe_search", [res.nfe_search], [case["nfe_search"]], errors)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", CASE_PARAMS)
def test_gits_cost_from_trajectories(path):
    """The denoiser-free path: teacher_trajectories -> cost_matrix, and teacher_dev (stored for every metric)."""
    _skip_if_missing()
    case = load_case(path)
    name, opts = student_call(case)
    t = t_steps_tea(case)
    tea = gits.teacher_trajectories(model_for(case), torch.from_numpy(case["warmup_noise"]), t,
                                    solver=teacher_name(case), afs=bool(case["afs"]),
                                    denoise_to_zero=bool(case["denoise_to_zero"]),
                                    **gits._inherit(teacher_name(case), opts))
    dev = torch.stack([gits.trajectory_deviation(tea.states[r]).mean(dim=1) for r in range(tea.rounds)])
    errors: list[str] = []
    _close("teacher_dev", dev.numpy(), case["teacher_dev"], 1e-9, errors)
    _close("teacher_final", tea.final.numpy(), case["teacher_final"], 1e-8, errors)
    # and the cost from the stored-trajectory path (no denoiser) equals the golden one
    cm = gits.cost_matrix(tea.states, tea.slopes, t, str(case["metric"]))
    _close("cost_matrix (from trajectories)", cm.cost.numpy(), case["cost_matrix"], 1e-9, errors)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", CASE_PARAMS)
def test_gits_student_case(path):
    """The student is our solver on the selected t_steps (from our own GITS run): trajectory, nfe, nfe_reported."""
    _skip_if_missing()
    case, res = _run(path)
    name, opts = solver_call(case)
    t = res.t_steps
    np.testing.assert_allclose(t.numpy(), case["t_steps"], rtol=1e-12, atol=0)
    with torch.no_grad():
        out = gits.run_student(model_for(case), torch.from_numpy(case["noise"]), t, name, **opts)
    ref = case["trajectory"]
    got = out.trajectory.numpy()
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    tol = 1e-8 * (1 + float(np.abs(ref).max()))
    assert err <= tol, f"trajectory: max abs error {err:.3e} > tolerance {tol:.3e}"
    assert float(np.abs(got[-1] - case["expected"]).max()) <= tol
    assert out.nfe == int(case["nfe"]), f"nfe {out.nfe} != reference {int(case['nfe'])}"
    reported = gits.reported_nfe(str(case["solver"]), int(case["num_steps"]), afs=bool(case["afs"]),
                                 denoise_to_zero=bool(case["denoise_to_zero"]))
    assert reported == int(case["nfe_reported"]), f"nfe_reported {reported} != reference {int(case['nfe_reported'])}"
    # what the student actually spends: k (len(t_steps) - 1) - afs (+1 denoise_to_zero), k evaluations per step.
    # The quirk: with afs and no inserted free step this is 1 (k=1) or 2 (k=2, dpm/heun) below what is printed.
    k = 2 if name in ("heun", "dpm2") else 1
    assert out.nfe == k * (len(t) - 1) - int(bool(case["afs"])) + int(bool(case["denoise_to_zero"]))
    if case["afs"] and len(case["dp_list"]) == len(case["dp_phi"]):
        assert reported - out.nfe == k


# ------------------------------------------------------------------------------------------------------------------
# Unit tests (no golden files needed).

def _brute_force(C, M, coeff):
    N = C.shape[0]
    best, arg = np.inf, None
    for mid in itertools.combinations(range(1, N - 1), M - 2):
        idx = [0, *mid, N - 1]
        v = gits.dp_objective(C, idx, coeff)
        if v < best:
            best, arg = v, idx
    return best, arg


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("coeff", [1.0, 1.15, 0.8, 2.0])
def test_dp_matches_brute_force(seed, coeff):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(5, 10))
    C = np.triu(rng.normal(size=(N, N)) + (2.0 if seed % 2 else 0.0), 1)    # negative entries too (dev can be < 0)
    for M in range(2, N + 1):
        phi = gits.gits_dp(C, M, coeff)
        assert len(phi) == M and phi[0] == 0 and phi[-1] == N - 1
        assert all(a < b for a, b in zip(phi, phi[1:]))
        best, arg = _brute_force(C, M, coeff)
        assert gits.dp_objective(C, phi, coeff) == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert phi == arg


def test_dp_ties_go_to_smallest_index():
    N = 6
    C = np.triu(np.ones((N, N)), 1)          # every path with M points costs the same
    assert gits.gits_dp(C, 3, 1.0) == [0, 1, 5]
    assert gits.gits_dp(C, 4, 1.0) == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        gits.gits_dp(C, N + 1, 1.0)
    with pytest.raises(ValueError):
        gits.gits_dp(C, 3, 0.0)


def test_warmup_rounds_and_reported_nfe():
    assert [gits.warmup_rounds(n, b) for n, b in [(64, 64), (128, 64), (96, 32), (256, 64), (129, 64)]] == [1, 2, 3, 4, 2]
    assert gits.warmup_rounds(129, 64, exact=True) == 3
    assert gits.reported_nfe("ipndm", 5, afs=True) == 4
    assert gits.reported_nfe("dpm", 4, afs=True) == 7
    assert gits.reported_nfe("dpm2", 4, afs=True, dp=False) == 5
    assert gits.reported_nfe("heun", 4) == 6
    assert gits.reported_nfe("euler", 6, afs=True, dp=False, denoise_to_zero=True, cfg=True) == 10


def test_schedule_to_sigmas():
    t = torch.tensor([80.0, 10.0, 1.0, 0.002], dtype=torch.float64)
    s = gits.schedule_to_sigmas(t)
    assert s == [80.0, 10.0, 1.0, 0.002, 0.0] and all(type(v) is float for v in s)
    assert gits.schedule_to_sigmas(t, append_zero=False) == [80.0, 10.0, 1.0, 0.002]
    assert gits.schedule_to_sigmas([3.0]) == [3.0, 0.0]
    with pytest.raises(ValueError):
        gits.schedule_to_sigmas([1.0, 2.0])
    with pytest.raises(ValueError):
        gits.schedule_to_sigmas([1.0, 0.0])


def _toy_denoiser():
    from amed_core.denoisers import GaussianMixtureDenoiser

    g = torch.Generator().manual_seed(0)
    D = 8
    means = torch.randn(3, D, generator=g, dtype=torch.float64)
    A = torch.randn(3, D, D, generator=g, dtype=torch.float64) * 0.3
    covs = A @ A.transpose(1, 2) + 0.05 * torch.eye(D, dtype=torch.float64)
    return GaussianMixtureDenoiser(np.array([0.2, 0.3, 0.5]), means.numpy(), covs.numpy(), shape=(2, 2, 2))


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm2", "ipndm", "ipndm_v", "dpmpp", "deis", "unipc"])
def test_recorded_slopes_equal_recomputed(solver):
    """The slopes taken from the teacher's own evaluations equal a recomputation; no extra NFE where recorded."""
    den = _toy_denoiser()
    t = schedules.get_schedule(9, 0.002, 80.0)
    noise = torch.randn(2, 4, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for afs in (False, True):
        tea = gits.teacher_trajectories(den, noise, t, solver=solver, afs=afs)
        for r in range(2):
            ref = gits.first_stage_slopes(den, tea.states[r], t, afs=afs)
            torch.testing.assert_close(tea.slopes[r], ref, rtol=0, atol=1e-13)
        with torch.no_grad():
            plain = gits.run_student(den, noise[0], t, solver, afs=afs).nfe
        if solver != "unipc":
            assert tea.nfe == 2 * plain


def test_cost_matrix_small_by_hand():
    """l2 / l1 / dev costs on a tiny trajectory, against the formulas written out directly."""
    g = torch.Generator().manual_seed(3)
    N, B = 4, 3
    X = torch.randn(1, N, B, 2, 1, 1, generator=g, dtype=torch.float64)
    d = torch.randn(1, N - 1, B, 2, 1, 1, generator=g, dtype=torch.float64)
    t = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)

    def dev(P, b):
        X0, E = X[0, 0, b].reshape(-1), X[0, -1, b].reshape(-1)
        u = (E - X0) / (E - X0).norm()
        v = E - P.reshape(-1)
        return float((v - (v @ u) * u).norm())

    for metric in ("l2", "l1", "dev"):
        cm = gits.cost_matrix(X, d, t, metric)
        for i in range(N):
            for j in range(N):
                if j <= i:
                    assert float(cm.cost[i, j]) == 0.0
                    continue
                Y = X[0, i] + (t[j] - t[i]) * d[0, i]
                if metric == "l2":
                    ref = np.mean([float((Y[b] - X[0, j, b]).norm()) for b in range(B)])
                elif metric == "l1":
                    ref = np.mean([float((Y[b] - X[0, j, b]).abs().sum()) for b in range(B)])
                else:
                    devT = np.mean([dev(X[0, j, b], b) for b in range(B)]) if j < N - 1 else 0.0
                    ref = np.mean([dev(Y[b], b) for b in range(B)]) - devT
                assert float(cm.cost[i, j]) == pytest.approx(ref, rel=1e-12, abs=1e-12), (metric, i, j)
    # two identical rounds: the sum doubles, the mean does not change
    cm1 = gits.cost_matrix(X, d, t, "l2")
    cm2 = gits.cost_matrix(torch.cat([X, X]), torch.cat([d, d]), t, "l2")
    torch.testing.assert_close(cm2.cost, cm1.cost)
    torch.testing.assert_close(cm2.cost_sum, 2 * cm1.cost_sum)


def test_gits_schedule_end_to_end_options():
    """A full run on a toy mixture: the schedule is a sub-grid; teacher_afs=False and search_on='all' run."""
    den = _toy_denoiser()
    t = schedules.get_schedule(15, 0.002, 80.0)
    g = torch.Generator().manual_seed(5)
    res = gits.gits_schedule(den, t, 5, solver="ipndm", solver_options={"max_order": 3}, teacher_solver="ipndm",
                             metric="l2", coeff=1.15, afs=True, teacher_afs=False, num_warmup=16, max_batch_size=8,
                             generator=g, search_on="all")
    assert res.warmup_rounds == 2 and res.teacher_final.shape == (2, 8, 2, 2, 2)
    assert res.dp_list[0] == 0 and res.dp_list[-1] == 14
    assert len(res.dp_list) in (5, 6)
    torch.testing.assert_close(res.t_steps, t[res.dp_list])
    assert res.sigmas()[-1] == 0.0 and len(res.sigmas()) == len(res.dp_list) + 1
    assert len(res.afs_dist) == len(res.afs_candidates) == res.dp_phi[1] - 1
    # the stored-trajectory path gives the same cost as running the teacher inside gits_schedule
    noise = torch.randn(1, 8, 2, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = gits.gits_schedule(den, t, 4, metric="dev", warmup_noise=noise, solver_options={"max_order": 4})
    tea = gits.teacher_trajectories(den, noise, t, solver="ipndm", max_order=4)
    stored = gits.TeacherTrajectories.from_states(den, tea.states, t)
    b = gits.gits_schedule(den, t, 4, metric="dev", teacher=stored, solver_options={"max_order": 4})
    torch.testing.assert_close(a.cost_matrix, b.cost_matrix, rtol=0, atol=1e-12)
    assert a.dp_list == b.dp_list
    # a DPM-Solver++ student with a free step inserted: the reference crashes here (stale num_steps), ours runs
    c = gits.gits_schedule(den, t, 4, solver="dpmpp", solver_options={"max_order": 3}, teacher_options={"max_order": 4},
                           metric="l2", coeff=2.0, afs=True, teacher_afs=False, warmup_noise=noise)
    if c.free_step is not None:
        assert len(c.dp_list) == 5 and c.dp_list[1] == c.free_step < c.dp_phi[1]
        assert min(c.afs_dist) == c.afs_dist[c.free_step - 1]
    out = gits.run_student(den, noise[0], c.t_steps, "dpmpp", afs=True, return_trajectory=True, max_order=3)
    assert out.nfe == len(c.t_steps) - 2 and out.trajectory.shape[0] == len(c.t_steps)
    # a stored shard-like object (duck-typed TeacherShard) gives the same slopes as the teacher's own
    shard = type("Shard", (), dict(states=tea.states[0], sigmas=t, labels=None, label_dim=0))()
    from_shard = gits.TeacherTrajectories.from_shard(shard, den)
    torch.testing.assert_close(from_shard.slopes, tea.slopes, rtol=0, atol=1e-13)
    with pytest.raises(ValueError):
        gits.gits_schedule(den, t, 4, solver_options={"afs": True}, warmup_noise=noise)
    with pytest.raises(ValueError):
        gits.gits_schedule(den, t, 4, metric="l3", warmup_noise=noise)
