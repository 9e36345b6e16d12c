"""The quality-vs-NFE table: FD to exact mixture samples and RMSE to the near-exact solution, per solver and NFE
(AMED paper, Zhou et al. 2024, arXiv 2312.00094, Tables 1-3 report the same kind of table with FID on real data).
A teacher that cannot draw exact samples (a network: no ``.sample``; see ``has_exact_samples``) gets RMSE only:
its FD fields are None.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..methods import evals_per_step
from ..metrics import fd_exact_gmm, fd_to_samples, rmse
from ..schedules import ScheduleSpec
from .sampling import REFERENCE_SOLVER, reference_solution, sample_solver, schedule_for, seeded_noise

__all__ = ["QualityRow", "QualityTable", "exact_samples", "fmt_score", "format_table", "has_exact_samples", "quality_table"]

log = logging.getLogger("amed_core.evaluate")

@dataclass
class QualityRow:
    """One line of the table: FD to exact mixture samples (and to the exact moments), RMSE to the near-exact ODE solution.

    ``fd`` / ``fd_exact`` are None for a teacher without exact samples (see :func:`has_exact_samples`)."""

    solver: str
    nfe: int
    num_steps: int
    afs: bool
    fd: float | None
    fd_exact: float | None
    rmse: float
    seconds: float
    schedule: str = ""
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QualityTable:
    """Rows plus the context a reader needs: FD of a second exact sample set (the noise floor of ``fd``;
    None, like every row's FD, for a teacher without exact samples)."""

    rows: list[QualityRow]
    n: int
    seed: int
    rmse_samples: int
    fd_floor: float | None
    reference: str
    reference_x: torch.Tensor | None = field(default=None, repr=False)  # the near-exact solution of the first rows

    @property
    def has_fd(self) -> bool:
        """Whether the rows carry FD (the teacher drew exact samples) or RMSE only."""
        return self.fd_floor is not None

    def to_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "rmse_samples": self.rmse_samples, "fd_floor": self.fd_floor,
                "reference": self.reference, "rows": [r.to_dict() for r in self.rows]}


def has_exact_samples(denoiser) -> bool:
    """Whether the teacher draws exact samples x0 ~ p(x0) (an analytic mixture's ``.sample``): FD needs them."""
    return callable(getattr(denoiser, "sample", None))


def exact_samples(denoiser, n: int, seed: int) -> torch.Tensor:
    """``n`` exact samples x0 of an analytic teacher from the generator seeded ``2^31 + seed`` (float64)."""
    if not has_exact_samples(denoiser):
        raise ValueError("quality_table needs a teacher that draws exact samples (an analytic mixture such as digits-gmm)")
    return denoiser.sample(n, generator=torch.Generator().manual_seed(2**31 + int(seed)), dtype=torch.float64)


def quality_table(denoiser, solvers: Sequence[str], nfes: Sequence[int], n: int, seed: int, *,
                  schedules: dict[str, ScheduleSpec] | None = None, options: dict[str, dict] | None = None,
                  afs: bool | None = None, rmse_samples: int = 512, reference_steps: int = 500,
                  batch_size: int = 1024, dtype: torch.dtype = torch.float64,
                  progress: Callable[[QualityRow], None] | None = None,
                  reference: torch.Tensor | None = None) -> QualityTable:
    """FD and RMSE of every (solver, NFE) on the same seeded noise.

    fd: Frechet distance between the n samples and n exact mixture samples; fd_exact: FD to the
    mixture's exact mean/covariance; fd_floor: FD between two exact sample sets of size n (what
    ``fd`` reads for a perfect sampler). rmse: to :func:`reference_solution` on the first
    ``rmse_samples`` samples (a subset keeps the 500-step reference cheap). A teacher without exact
    samples (a network) gets RMSE only: fd, fd_exact and fd_floor are None. Schedules not given use the solver's
    default over the denoiser's own sigma range. ``reference``: the near-exact solution of the first
    ``rmse_samples`` noises (from an earlier table's ``reference_x``) instead of computing it again.
    """
    if not solvers:
        raise ValueError("solvers must name at least one solver")
    for s in solvers:
        evals_per_step(s)
    nfes = [int(v) for v in nfes]
    for v in nfes:
        if v < 1:
            raise ValueError(f"nfe values must be positive integers, got {v}")
    if rmse_samples < 1:
        raise ValueError(f"rmse_samples must be >= 1, got {rmse_samples}")
    schedules = schedules or {}
    options = options or {}
    noise = seeded_noise(range(seed, seed + n), denoiser.shape, dtype=torch.float64)
    exact = floor = None
    if has_exact_samples(denoiser):
        exact = exact_samples(denoiser, n, seed)
        floor = fd_to_samples(exact_samples(denoiser, n, seed + 1), exact)
    m = min(rmse_samples, n)
    sched0 = schedule_for(denoiser, solvers[0], schedules.get(solvers[0]))
    t0 = time.perf_counter()
    if reference is not None:
        if tuple(reference.shape) != (m, *denoiser.shape):
            raise ValueError(f"reference must be ({m}, {', '.join(map(str, denoiser.shape))}) (rmse_samples rows), "
                             f"got {tuple(reference.shape)}")
        ref = reference.to(torch.float64)
    else:
        ref = reference_solution(denoiser, noise[:m], sched0, num_steps=reference_steps, batch_size=batch_size)
        log.info("reference solution for %d samples: %.1f s", m, time.perf_counter() - t0)
    rows = []
    for s in solvers:
        for v in nfes:
            run = sample_solver(denoiser, s, v, n, seed, schedule_for(denoiser, s, schedules.get(s)), options.get(s), afs=afs, dtype=dtype,
                                batch_size=batch_size, noise=noise)
            if (run.schedule.sigma_min, run.schedule.sigma_max) != (sched0.sigma_min, sched0.sigma_max):
                raise ValueError("all schedules must share sigma_min and sigma_max (one reference solution serves them all)")
            x = run.x.double()
            fd, fd_exact = (None, None) if exact is None else (fd_to_samples(x, exact), fd_exact_gmm(x, denoiser))
            row = QualityRow(s, v, run.num_steps, run.afs, fd, fd_exact, rmse(x[:m], ref), run.seconds,
                             _schedule_label(run.schedule), run.options)
            rows.append(row)
            if progress is not None:
                progress(row)
    return QualityTable(rows, n, seed, m, floor, f"{REFERENCE_SOLVER}-3M, {reference_steps} logSNR points, float64",
                        reference_x=ref)


def _schedule_label(s: ScheduleSpec) -> str:
    return s.schedule_type + (f"(rho={s.rho:g})" if s.schedule_type in ("polynomial", "time_uniform", "discrete") else "")


def fmt_score(value: float | None, digits: int = 4, width: int = 9) -> str:
    """A score right-aligned in ``width`` columns, or ``n/a`` (FD of a teacher without exact samples)."""
    return f"{'n/a':>{width}s}" if value is None else f"{value:{width}.{digits}f}"


def format_table(table: QualityTable) -> str:
    """The table as aligned text (one line per solver x NFE); FD columns read ``n/a`` without exact samples."""
    head = f"{'solver':8s} {'NFE':>4s} {'N':>3s} {'AFS':>3s} {'FD':>9s} {'FD-exact':>9s} {'RMSE':>9s} {'sec':>6s}  schedule"
    lines = [head, "-" * len(head)]
    for r in table.rows:
        lines.append(f"{r.solver:8s} {r.nfe:4d} {r.num_steps:3d} {'yes' if r.afs else 'no':>3s} {fmt_score(r.fd)} "
                     f"{fmt_score(r.fd_exact)} {r.rmse:9.5f} {r.seconds:6.2f}  {r.schedule}")
    floor = (f"FD floor of exact samples = {table.fd_floor:.4f}" if table.has_fd
             else "FD n/a: the teacher draws no exact samples")
    lines.append(f"(n={table.n}, seed={table.seed}; {floor}; RMSE on {table.rmse_samples} samples vs {table.reference})")
    return "\n".join(lines)
