"""One sampler's score under a sweep's evaluation protocol (fd_exact, rmse or fid) on per-seed noise, resumable
for FID (partial :class:`~amed_core.fid.FIDStats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..fid import FIDStats, to_uint8
from ..metrics import fd_exact_gmm
from ..teacher import trajectory_inputs  # the teacher's noise/label draw, so scores match its seeds

__all__ = ["FIDSetup", "SCORE_METRICS", "ScoreResult", "score_run", "to_images"]

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
    per_sample: dict | None = None  # rmse: each sample's RMSE to its reference solution: median, p90, p99, max
    errors: torch.Tensor | None = None  # rmse: every sample's RMSE to its reference (n,), float64, in seed order


def per_sample_summary(errors: torch.Tensor) -> dict:
    """{"median", "p90", "p99", "max", "mean"} of per-sample errors (float64)."""
    e = errors.to(torch.float64).reshape(-1)
    q = torch.quantile(e, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(e.max()), "mean": float(e.mean())}


def _inputs(seeds: Sequence[int], denoiser, label_dim: int, device, dtype=torch.float64):
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
    - ``rmse``: sqrt(sum_j ||x_j - x*_j||^2 / (n d)) to the near-exact ODE solution of the same noise: ``reference``
      is either the stored solutions of all ``seeds`` ((n, C, H, W), in seed order; what a sweep does,
      :mod:`amed_core.evaluate.reference`) or ``reference(noise, labels)`` per batch (a tensor or a result with ``.x``);
      ``errors`` holds every sample's RMSE;
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
    per: list[torch.Tensor] = []

    if metric == "rmse" and torch.is_tensor(reference) and (reference.ndim != 4 or reference.shape[0] < n):
        raise ValueError(f"reference holds {tuple(reference.shape)}: it must be (n, C, H, W), one solution per seed "
                         f"({n} seeds)")

    def draw(chunk, pictures: int, lo: int = 0):
        """(states, NFE, squared error to the reference, images of the first ``pictures`` (all for fid)); ``lo``:
        the chunk's first position in ``seeds``."""
        noise, onehot = _inputs(chunk, denoiser, label_dim, device)
        with torch.no_grad():
            res = run(noise, onehot)
            x = res.x.to(device="cpu", dtype=torch.float64)
            e2 = None
            if metric == "rmse":
                ref = reference[lo:lo + len(chunk)] if torch.is_tensor(reference) else reference(noise, onehot)
                ref = getattr(ref, "x", ref)
                d2 = ((x - ref.to(device="cpu", dtype=torch.float64)) ** 2).reshape(x.shape[0], -1)
                e2 = (float(d2.sum()), d2.mean(dim=1).sqrt())
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
        x, nfe, e2, img = draw(chunk, max(0, min(keep - have, len(chunk))), lo)
        finite = finite and bool(torch.isfinite(x).all())
        if metric == "rmse":
            err2 += e2[0]
            per.append(e2[1])
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
    errors = torch.cat(per) if per else None
    summary = per_sample_summary(errors) if per else None
    return ScoreResult(metric, float(value), int(nfe), n, finite, samples, stats, summary, errors)
