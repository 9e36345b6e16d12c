"""Generating teacher shards: trajectory ``j`` starts from ``x(t_0) = t_0 * n_j``, ``n_j ~ N(0, I)`` drawn from its
own generator seeded ``base_seed + j``, so a shard's content never depends on batch size or worker."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..methods import solve
from ..schedules import grid_indices
from ..shards import TeacherShard, storage_dtype
from .spec import COMPUTE_DTYPES, TeacherSpec, canonical_json, freeze_json

__all__ = ["trajectory_inputs", "generate_shard", "teacher_nfe_per_trajectory"]


def trajectory_inputs(seeds: torch.Tensor | Sequence[int], shape: Sequence[int], *, label_policy: str = "none",
                      label_dim: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sample noise n_j ~ N(0, I) (float64) and class index, each from ``torch.Generator().manual_seed(seed_j)``.

    The noise is drawn first, then (label_policy 'uniform') one class index; batch size never matters.
    """
    seeds = [int(s) for s in torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)]
    noise, labels = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float64))
        if label_policy == "uniform":
            labels.append(torch.randint(label_dim, (1,), generator=g))
    lab = torch.cat(labels).to(torch.int64) if labels else None
    return torch.stack(noise), lab


def _one_hot(labels: Optional[torch.Tensor], label_dim: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    return torch.nn.functional.one_hot(labels, label_dim).to(dtype)


def _check_identity(denoiser, spec: TeacherSpec) -> None:
    have = freeze_json(denoiser.identity(), "denoiser.identity()")
    if canonical_json(have) != canonical_json(spec.model):
        raise ValueError(f"denoiser identity {have} does not match the teacher spec's model {dict(spec.model)}: "
                         "load the model the spec was made for")


def generate_shard(denoiser, spec: TeacherSpec, index: int, *, batch_size: int | None = None,
                   device: torch.device | str | None = None) -> TeacherShard:
    """Shard ``index`` of ``spec``: the teacher solver on ``spec.teacher_grid()``, states kept at U's points.

    Runs under ``torch.no_grad`` in ``spec.compute_dtype`` in chunks of ``batch_size`` (default: the
    whole shard); the result does not depend on the chunking (per-sample seeds).
    ``nfe`` = denoiser evaluations per trajectory, as the solver counts them.
    """
    _check_identity(denoiser, spec)
    seeds = spec.seeds(index)
    noise64, labels = trajectory_inputs(seeds, spec.shape, label_policy=spec.label_policy, label_dim=spec.label_dim)
    grid = spec.teacher_grid()
    keep = grid_indices(grid, spec.union_grid())
    cdtype = COMPUTE_DTYPES[spec.compute_dtype]
    sdtype = storage_dtype(spec.dtype)
    if device is None:
        p = next(iter(list(denoiser.parameters()) + list(denoiser.buffers())), None)
        device = p.device if p is not None else torch.device("cpu")
    B = seeds.shape[0]
    batch_size = B if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks, nfe = [], None
    for lo in range(0, B, batch_size):
        sl = slice(lo, min(B, lo + batch_size))
        x = (noise64[sl] * grid[0]).to(device=device, dtype=cdtype)
        cl = _one_hot(labels[sl] if labels is not None else None, spec.label_dim, cdtype)
        if cl is not None:
            cl = cl.to(device)
        with torch.no_grad():
            if len(keep) * 2 <= len(grid):  # a few kept points of a long grid (e.g. a reference): no whole trajectory
                res, traj = _solve_keeping(spec, denoiser, x, grid, keep, cl)
            else:
                res = solve(spec.solver, denoiser, x, grid, class_labels=cl, return_trajectory=True,
                            **spec.solver_options)
                traj = res.trajectory[keep.to(res.trajectory.device)]
        if not torch.isfinite(traj).all():
            raise FloatingPointError(f"teacher produced non-finite states in shard {index} (solver {spec.solver!r})")
        chunks.append(traj.to(device="cpu", dtype=sdtype))
        if nfe is not None and res.nfe != nfe:
            raise RuntimeError(f"teacher NFE changed between chunks ({nfe} vs {res.nfe})")
        nfe = res.nfe
    states = torch.cat(chunks, dim=1)
    return TeacherShard(spec_hash=spec.spec_hash, index=index, seeds=seeds, noise=noise64.to(sdtype),
                        states=states.contiguous(), sigmas=spec.union_grid(), labels=labels,
                        label_dim=spec.label_dim, nfe=int(nfe))


def _solve_keeping(spec: TeacherSpec, denoiser, x: torch.Tensor, grid: torch.Tensor, keep: torch.Tensor, cl):
    """The solver on ``grid``, keeping only the states at ``keep`` (from the step callback: state ``i + 1`` after step
    ``i``), so memory does not grow with the grid's length."""
    want = [int(k) for k in keep]
    got = {0: x} if 0 in want else {}
    wanted = set(want)

    def keep_state(info) -> None:
        if info.i + 1 in wanted:
            got[info.i + 1] = info.x.detach().clone()

    res = solve(spec.solver, denoiser, x, grid, class_labels=cl, callback=keep_state, **spec.solver_options)
    missing = [k for k in want if k not in got]
    if missing:
        raise RuntimeError(f"teacher solver {spec.solver!r} reported no state at grid points {missing[:4]}")
    return res, torch.stack([got[k] for k in want])


def teacher_nfe_per_trajectory(solver: str, sigmas: torch.Tensor, *, shape: Sequence[int] = (1, 1, 1),
                               **options) -> int:
    """Exact denoiser evaluations one trajectory of ``solver`` on ``sigmas`` costs (counted, not estimated)."""

    class _Zero(torch.nn.Module):
        def forward(self, x, sigma, class_labels=None):
            return torch.zeros_like(x)

    x = torch.ones(1, *shape, dtype=torch.float64)
    return int(solve(solver, _Zero(), x, sigmas, **options).nfe)
