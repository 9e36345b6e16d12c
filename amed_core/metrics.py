"""Quality metrics: Frechet distance (numerically robust), exact metrics for analytic teachers.

- ``frechet_distance(mu1, sigma1, mu2, sigma2)``: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)),
  with the trace of the square root taken from the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric
  PSD, so no complex parts and no scipy.linalg.sqrtm instabilities); float64 throughout.
- ``fd_to_samples(x, y)``: FD between two sample sets in pixel space (used for analytic teachers).
- ``rmse(x, y)``: per-run root mean squared error to a reference (e.g. a near-exact ODE solution).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["frechet_distance", "moments", "fd_to_samples", "rmse", "fd_exact_gmm"]


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed stably in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def moments(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows = samples) in float64."""
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def fd_to_samples(x, y) -> float:
    """Frechet distance between two sample sets, flattened to vectors."""
    return frechet_distance(*moments(x), *moments(y))


def fd_exact_gmm(x, gmm) -> float:
    """FD between samples and the mixture's exact first two moments (no reference-sample noise)."""
    w = gmm.log_weights.exp().double().numpy()
    mu_k = gmm.means.double().numpy()
    lam, U = gmm.evals.double().numpy(), gmm.evecs.double().numpy()
    cov_k = np.einsum("kde,ke,kfe->kdf", U, lam, U)
    mu = w @ mu_k
    cov = np.einsum("k,kdf->df", w, cov_k + np.einsum("kd,kf->kdf", mu_k - mu, mu_k - mu))
    return frechet_distance(*moments(x), mu, cov)


def rmse(x, y) -> float:
    """Root mean squared error between two equally shaped batches."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"rmse needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return float(torch.sqrt(torch.mean((x - y) ** 2)))
