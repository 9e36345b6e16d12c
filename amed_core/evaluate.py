"""Sampling with the training-free solvers and scoring them: the quality-vs-NFE table.

- ``seeded_noise(seeds, shape)``: one ``torch.Generator`` per sample seed (EDM's convention), so a
  sample depends only on its seed, never on the batch it was drawn in.
- ``num_steps_for(solver, nfe, afs)``: the grid size N that spends exactly ``nfe`` evaluations
  (NFE = k (N - 1) - afs, k = 2 for heun/dpm2 and the AMED solvers, 1 otherwise; see DESIGN.md). One
  implementation for every solver: it lives in :mod:`amed_core.amed.spec` and is re-exported here.
- ``sample_solver(...)``: samples of one solver at one NFE; ``reference_solution(...)``: the
  near-exact ODE solution of the same noise (for RMSE); ``quality_table(...)``: FD to exact
  mixture samples and RMSE to the near-exact solution, per solver and NFE (AMED paper, Zhou et
  al. 2024, arXiv 2312.00094, Tables 1-3 report the same kind of table with FID on real data).
  A teacher that cannot draw exact samples (a network: no ``.sample``; see ``has_exact_samples``)
  gets RMSE only: its FD fields are None.
- ``score_run(run, denoiser, ...)``: one sampler's score under a sweep's evaluation protocol (fd_exact,
  rmse or fid) on per-seed noise, resumable for FID (partial :class:`~amed_core.fid.FIDStats`).
- ``save_grid_png`` / ``save_quality_plot``: the pictures (PIL / matplotlib Agg), written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .fid import FIDStats, to_uint8
from .io import atomic_write
from .metrics import fd_exact_gmm, fd_to_samples, rmse
from .schedules import ScheduleSpec
from .methods import evals_per_step, get_method, get_solver, method_names, num_steps_for, pick_afs, solve, solver_options
from .solvers._common import COMMON_OPTIONS

__all__ = [
    "BASE_SOLVERS",
    "atomic_write",
    "DEFAULT_OPTIONS",
    "DEFAULT_SCHEDULES",
    "QualityRow",
    "SampleRun",
    "FIDSetup",
    "ScoreResult",
    "score_run",
    "default_schedule",
    "evals_per_step",
    "num_steps_for",
    "pick_afs",
    "quality_table",
    "reference_solution",
    "sample_solver",
    "save_figure_png",
    "save_grid_png",
    "to_images",
    "save_quality_plot",
    "seeded_noise",
    "format_table",
    "fmt_score",
    "has_exact_samples",
    "exact_samples",
    "batch_ranges",
]

log = logging.getLogger(__name__)

# Views of the method table (amed_core.methods.table): the training-free solvers, and the diff-solvers
# reference's recommended schedules and options (its launch.sh), used unless the caller overrides them.
BASE_SOLVERS = method_names("free")
DEFAULT_SCHEDULES: dict[str, ScheduleSpec] = {n: get_method(n).default_schedule for n in BASE_SOLVERS}
DEFAULT_OPTIONS: dict[str, dict] = {n: dict(get_method(n).default_options) for n in BASE_SOLVERS
                                    if get_method(n).default_options}


# ---------------------------------------------------------------------------------------------
# Noise, NFE and grids.

def seeded_noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise ``(len(seeds), *shape)``; row i is drawn from its own generator seeded
    ``seeds[i]`` (in float64, then cast), so it does not depend on batching or on the dtype asked for."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float64)
    g = torch.Generator()
    for i, s in enumerate(seeds):
        g.manual_seed(int(s))
        out[i] = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    return out.to(dtype=dtype, device=device)


def default_schedule(solver: str) -> ScheduleSpec:
    """The reference's recommended schedule for a solver (EDM rho=7 for euler/heun/dpm2/ipndm*, logSNR for
    dpmpp/unipc, time-uniform rho=2 for deis; AMED-Solver time-uniform rho=1, amed+dpmpp logSNR): the method table's."""
    return get_method(solver).default_schedule


def _options_for(solver: str, options: dict | None) -> dict:
    opts = dict(get_method(solver).default_options)
    opts.update(options or {})
    allowed = set(solver_options(solver)) - set(COMMON_OPTIONS)
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ValueError(f"solver {solver!r} has no option(s) {unknown}; allowed: {sorted(allowed)}")
    return opts


# ---------------------------------------------------------------------------------------------
# Sampling.

@dataclass
class SampleRun:
    """Samples of one solver run: x (n, C, H, W) at sigma_min, and its cost."""

    solver: str
    nfe: int
    num_steps: int
    afs: bool
    schedule: ScheduleSpec
    options: dict
    x: torch.Tensor
    seconds: float


def batch_ranges(n: int, batch_size: int) -> Iterable[tuple[int, int]]:
    """``(lo, hi)`` index ranges of ``n`` rows in batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for lo in range(0, n, batch_size):
        yield lo, min(n, lo + batch_size)


def sample_solver(denoiser, solver: str, nfe: int, n: int, seed: int, schedule: ScheduleSpec | None = None,
                  options: dict | None = None, *, afs: bool | None = None,
                  dtype: torch.dtype = torch.float64, batch_size: int = 1024, class_labels=None,
                  noise: torch.Tensor | None = None) -> SampleRun:
    """``n`` samples of ``solver`` at exactly ``nfe`` evaluations, from noise with seeds ``seed .. seed+n-1``.

    ``schedule`` defaults to :func:`default_schedule`, ``options`` are merged over :data:`DEFAULT_OPTIONS`,
    ``afs=None`` picks AFS only where the NFE needs it. ``noise`` (n, C, H, W) overrides the seeds.
    """
    get_solver(solver)
    if n < 1:
        raise ValueError(f"n (number of samples) must be >= 1, got {n}")
    use_afs = pick_afs(solver, nfe, afs)
    opts = _options_for(solver, options)
    N = num_steps_for(solver, nfe, use_afs, opts)
    schedule = schedule or default_schedule(solver)
    sigmas = schedule.grid(N)
    if noise is None:
        noise = seeded_noise(range(seed, seed + n), denoiser.shape, dtype=dtype)
    t0 = time.perf_counter()
    x = _solve_batches(solver, denoiser, noise[:n].to(dtype) * sigmas[0].to(dtype), sigmas, batch_size=batch_size,
                       class_labels=class_labels, nfe=nfe, afs=use_afs, **opts)
    return SampleRun(solver, nfe, N, use_afs, schedule, opts, x, time.perf_counter() - t0)


def _solve_batches(solver: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, batch_size: int, class_labels=None,
                   nfe: int | None = None, **options) -> torch.Tensor:
    """``solve`` from the starting points ``x`` in batches (rows are independent), without autograd, concatenated;
    ``nfe``: the evaluations every batch must spend (a mismatch is an accounting bug)."""
    out = []
    with torch.no_grad():
        for lo, hi in batch_ranges(x.shape[0], batch_size):
            labels = None if class_labels is None else class_labels[lo:hi]
            res = solve(solver, denoiser, x[lo:hi], sigmas, class_labels=labels, **options)
            if nfe is not None and res.nfe != nfe:
                raise RuntimeError(f"{solver} spent {res.nfe} evaluations, expected {nfe}")
            out.append(res.x)
    return torch.cat(out)


REFERENCE_SOLVER = "dpmpp"
REFERENCE_OPTIONS = {"max_order": 3, "predict_x0": True, "lower_order_final": False, "dynamic_thresholding": False}


def reference_solution(denoiser, noise: torch.Tensor, schedule: ScheduleSpec | None = None, *, num_steps: int = 500,
                       batch_size: int = 1024, class_labels=None) -> torch.Tensor:
    """Near-exact solution at ``schedule.sigma_min`` of the ODE started at ``noise * sigma_max`` (float64).

    Multistep DPM-Solver++ (data prediction, no thresholding) with ``num_steps`` points uniform in
    log sigma. On digits-gmm (sigma 80 -> 0.002), 500 points (500 NFE) are within RMSE 4.3e-6
    (max 1.8e-5) of scipy's DOP853 at rtol = atol = 1e-12 (8 samples); Heun with 500 points
    (1000 NFE) is at 2.3e-5. The ODE solution does not depend on the grid, only on its ends.
    """
    schedule = schedule or ScheduleSpec()
    ref_sched = ScheduleSpec("logsnr", sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max)
    sigmas = ref_sched.grid(num_steps)
    return _solve_batches(REFERENCE_SOLVER, denoiser, noise.to(torch.float64) * sigmas[0], sigmas, batch_size=batch_size,
                          class_labels=class_labels, **REFERENCE_OPTIONS)


# ---------------------------------------------------------------------------------------------
# The quality table.

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
                  progress: Callable[[QualityRow], None] | None = None) -> QualityTable:
    """FD and RMSE of every (solver, NFE) on the same seeded noise.

    fd: Frechet distance between the n samples and n exact mixture samples; fd_exact: FD to the
    mixture's exact mean/covariance; fd_floor: FD between two exact sample sets of size n (what
    ``fd`` reads for a perfect sampler). rmse: to :func:`reference_solution` on the first
    ``rmse_samples`` samples (a subset keeps the 500-step reference cheap). A teacher without exact
    samples (a network) gets RMSE only: fd, fd_exact and fd_floor are None.
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
    sched0 = schedules.get(solvers[0]) or default_schedule(solvers[0])
    t0 = time.perf_counter()
    ref = reference_solution(denoiser, noise[:m], sched0, num_steps=reference_steps, batch_size=batch_size)
    log.info("reference solution for %d samples: %.1f s", m, time.perf_counter() - t0)
    rows = []
    for s in solvers:
        for v in nfes:
            run = sample_solver(denoiser, s, v, n, seed, schedules.get(s), options.get(s), afs=afs, dtype=dtype,
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
    return QualityTable(rows, n, seed, m, floor, f"{REFERENCE_SOLVER}-3M, {reference_steps} logSNR points, float64")


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


# ---------------------------------------------------------------------------------------------
# Pictures (written atomically, amed_core.io.atomic_write).

def save_grid_png(samples: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None, scale: int | None = None,
                  pad: int = 1) -> Path:
    """A PNG grid of images in [-1, 1] (B, C, H, W) with C = 1 or 3; small images are enlarged (nearest)."""
    from PIL import Image

    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"samples must be (B, 1 or 3, H, W) with B >= 1, got {tuple(x.shape)}")
    B, C, H, W = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / nrow)
    scale = scale or max(1, 64 // max(H, W))
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for k in range(B):
        r, c = divmod(k, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img[k]
    pil = Image.fromarray(grid[..., 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def save_quality_plot(table: QualityTable, path: str | os.PathLike, *, title: str = "") -> Path:
    """FD and RMSE against NFE, one line per solver (log scale), as a PNG (RMSE only without exact samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["fd"] if table.has_fd else []) + ["rmse"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = list(axes[0])
    solvers = list(dict.fromkeys(r.solver for r in table.rows))
    for s in solvers:
        rs = sorted((r for r in table.rows if r.solver == s), key=lambda r: r.nfe)
        for ax, key in zip(axes, panels):
            ax.plot([r.nfe for r in rs], [getattr(r, key) for r in rs], marker="o", label=s)
    nfes = sorted({r.nfe for r in table.rows})
    for ax in axes:
        ax.set_xticks(nfes)
    if table.has_fd:
        axes[0].axhline(table.fd_floor, color="gray", ls="--", lw=1, label="exact samples")
    names = {"fd": "FD to exact samples", "rmse": "RMSE to near-exact ODE solution"}
    for ax, name in zip(axes, (names[k] for k in panels)):
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"quality vs NFE (n={table.n}, seed={table.seed})")
    return save_figure_png(fig, path, dpi=100)


def save_figure_png(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Lay out a matplotlib figure, write it as a PNG atomically (:func:`atomic_write`) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# One sampler under a sweep's evaluation protocol.

SCORE_METRICS = ("fd_exact", "rmse", "fid")


@dataclass
class FIDSetup:
    """What metric ``fid`` needs: the Inception feature network (:func:`amed_core.fid.load_inception`) and the
    reference statistics ``(mu_ref, sigma_ref)`` (an ``.npz`` read with :func:`amed_core.fid.load_reference_stats`)."""

    net: torch.nn.Module
    mu_ref: np.ndarray
    sigma_ref: np.ndarray


@dataclass
class ScoreResult:
    """A score: ``value`` (lower is better), the evaluations per sample ``nfe``, ``num_samples`` scored,
    ``finite`` (every sample finite), ``samples`` (the first ``keep`` samples, float64 on the CPU) and, for
    fid, the final feature statistics ``stats``."""

    metric: str
    value: float
    nfe: int
    num_samples: int
    finite: bool
    samples: torch.Tensor
    stats: FIDStats | None = None


def _inputs(seeds: Sequence[int], denoiser, label_dim: int, device, dtype=torch.float64):
    from .teacher import trajectory_inputs  # the teacher's noise/label draw, so scores match its seeds

    noise, labels = trajectory_inputs(seeds, denoiser.shape, label_policy="uniform" if label_dim else "none",
                                      label_dim=label_dim)
    noise = noise.to(device=device, dtype=dtype)
    onehot = (torch.nn.functional.one_hot(labels, label_dim).to(device=device, dtype=dtype)
              if labels is not None else None)
    return noise, onehot


def to_images(denoiser, x: torch.Tensor) -> torch.Tensor:
    """Pictures of final states ``x``: a latent model's decoder output (images in [-1, 1], on x's device and dtype);
    ``x`` itself for pixel-space models (no ``decode``, or one that is the identity)."""
    decode = getattr(denoiser, "decode", None)
    if decode is None:
        return x
    with torch.no_grad():
        return decode(x).to(dtype=x.dtype)


def score_run(run: Callable, denoiser, *, seeds: Sequence[int], batch_size: int, metric: str,
              reference: Callable | None = None, fid: FIDSetup | None = None, label_dim: int = 0,
              device: torch.device | str = "cpu", keep: int = 0, partial: FIDStats | None = None,
              partial_finite: bool = True, on_batch: Callable[[FIDStats, bool], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> ScoreResult:
    """Score ``run(noise, labels) -> result (.x, .nfe)`` on per-sample seeded noise (AMED paper, Zhou et al.
    2024, arXiv 2312.00094, Sec. 5: quality at a fixed NFE).

    Sample j uses noise (and, with ``label_dim`` > 0, a uniform class label) drawn from
    ``torch.Generator().manual_seed(seeds[j])`` (:func:`amed_core.teacher.trajectory_inputs`), in float64,
    so the score never depends on ``batch_size``. Metrics (lower is better):

    - ``fd_exact``: Frechet distance ||mu - mu*||^2 + tr(S + S* - 2 (S S*)^{1/2}) of the samples' moments to the
      mixture's exact ones (:func:`amed_core.metrics.fd_exact_gmm`; analytic teachers only);
    - ``rmse``: sqrt(sum_j ||x_j - x*_j||^2 / (n d)) to ``reference(noise, labels)`` (the near-exact ODE
      solution of the same noise, a tensor or a result with ``.x``);
    - ``fid``: FID of the samples (images in [-1, 1], quantised with :func:`amed_core.fid.to_uint8`; latent
      models' samples decoded first, :func:`to_images`) against ``fid``'s reference statistics. ``partial``
      (statistics of the first ``partial.n`` seeds, e.g. from an
      interrupted run; ``partial_finite`` says whether those samples were finite) resumes the pass; after every
      batch ``on_batch(stats_so_far, finite_so_far)`` may persist them (``FIDStats.to_bytes``).

    ``keep``: how many of the first samples to return as pictures (decoded for latent models); ``progress(done,
    total)`` after each batch.
    """
    if metric not in SCORE_METRICS:
        raise ValueError(f"evaluation.metric must be one of {SCORE_METRICS}, got {metric!r}")
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if n < 2:
        raise ValueError(f"evaluation.num_samples must be >= 2, got {n}")
    if batch_size < 1:
        raise ValueError(f"evaluation.batch_size must be >= 1, got {batch_size}")
    if keep < 0:
        raise ValueError(f"keep (samples returned for the grid) must be >= 0, got {keep}")
    keep = min(keep, n)
    if metric == "rmse" and reference is None:
        raise ValueError("metric 'rmse' needs reference(noise, labels): the near-exact solution of the same noise")
    if metric == "fd_exact" and not hasattr(denoiser, "log_weights"):
        raise ValueError("metric 'fd_exact' needs an analytic mixture teacher (use 'rmse' or 'fid')")
    stats = None
    if metric == "fid":
        if fid is None:
            raise ValueError("metric 'fid' needs fid=FIDSetup(net, mu_ref, sigma_ref) (Inception weights and "
                             "reference statistics; nothing is downloaded)")
        C = denoiser.shape[0]
        if getattr(denoiser, "decode", None) is None and (len(denoiser.shape) != 3 or C not in (1, 3)):
            raise ValueError(f"metric 'fid' needs pixel images (1 or 3, H, W); the teacher's samples are "
                             f"{tuple(denoiser.shape)} and it has no decoder (decode)")
        if partial is not None:
            if not 0 <= partial.n <= n or partial.total.shape != np.asarray(fid.mu_ref).shape:
                raise ValueError(f"partial FID statistics hold {partial.n} samples of dimension {partial.total.shape}; "
                                 f"expected at most {n} of dimension {np.asarray(fid.mu_ref).shape} (stale cache? delete it)")
            stats = FIDStats(partial.n, partial.total.copy(), partial.outer.copy())
        else:
            stats = FIDStats.empty(int(np.asarray(fid.mu_ref).shape[0]))
    elif partial is not None:
        raise ValueError("partial statistics only resume metric 'fid'")
    start = stats.n if stats is not None else 0
    finite = bool(partial_finite) if start else True
    kept: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []
    err2, nfe, numel = 0.0, None, 0

    def draw(chunk, pictures: int):
        """(states, NFE, squared error to the reference, images of the first ``pictures`` (all for fid))."""
        noise, onehot = _inputs(chunk, denoiser, label_dim, device)
        with torch.no_grad():
            res = run(noise, onehot)
            x = res.x.to(device="cpu", dtype=torch.float64)
            e2 = None
            if metric == "rmse":
                ref = reference(noise, onehot)
                ref = getattr(ref, "x", ref)
                e2 = float(((x - ref.to(device="cpu", dtype=torch.float64)) ** 2).sum())
            m = len(chunk) if metric == "fid" else pictures
            img = to_images(denoiser, res.x[:m]).to(device="cpu", dtype=torch.float64) if m else x[:0]
        if metric == "fid" and (img.ndim != 4 or img.shape[1] not in (1, 3)):
            raise ValueError(f"metric 'fid' needs pixel images (B, 1 or 3, H, W); the decoded samples are {tuple(img.shape)}")
        return x, int(res.nfe), e2, img

    if start and (keep > 0 or start >= n):  # resumed: redraw the first samples for the picture (and the NFE)
        m = max(min(keep, start), 1)
        _, nfe, _, img = draw(seeds[:m], min(keep, m))
        kept.append(img[:keep])
    for lo in range(start, n, batch_size):
        chunk = seeds[lo:lo + batch_size]
        have = sum(k.shape[0] for k in kept)
        x, nfe, e2, img = draw(chunk, max(0, min(keep - have, len(chunk))))
        finite = finite and bool(torch.isfinite(x).all())
        if metric == "rmse":
            err2 += e2
        numel += x.numel()
        if have < keep:
            kept.append(img[: keep - have])
        if metric == "fd_exact":
            xs.append(x)
        elif metric == "fid":
            stats.update(fid.net(to_uint8(img)))
            if on_batch is not None:
                on_batch(stats, finite)
        if progress is not None:
            progress(lo + len(chunk), n)
    if metric == "fd_exact":
        value = fd_exact_gmm(torch.cat(xs), denoiser.cpu())
    elif metric == "rmse":
        value = (err2 / numel) ** 0.5
    else:
        value = stats.fid(fid.mu_ref, fid.sigma_ref)
    samples = torch.cat(kept) if kept else torch.empty((0, *denoiser.shape), dtype=torch.float64)  # pictures
    return ScoreResult(metric, float(value), int(nfe), n, finite, samples, stats)
