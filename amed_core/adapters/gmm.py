"""The exact denoiser of a Gaussian mixture (the analytic teachers ``digits-gmm`` and ``gmm:PATH.npz``)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from ..base_denoiser import BaseDenoiser, check_data_range

__all__ = ["GaussianMixtureDenoiser"]


def _float_array(name: str, a) -> np.ndarray:
    """``a`` as float64, refusing non-numeric arrays and NaN/inf (named by field)."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"mixture field {name!r} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"mixture field {name!r} holds NaN or inf ({int(np.sum(~np.isfinite(arr)))} values)")
    return arr


class GaussianMixtureDenoiser(BaseDenoiser):
    """Exact denoiser of a Gaussian mixture  p(x0) = sum_k w_k N(mu_k, C_k).

    D(x; s) = sum_k g_k(x) [mu_k + C_k (C_k + s^2 I)^-1 (x - mu_k)],
    g_k ∝ w_k N(x; mu_k, C_k + s^2 I), evaluated with eigendecompositions C_k = U_k diag(l_k) U_k^T
    and a log-sum-exp over components, in the input's dtype (float64 capable).
    AMED feature stand-in: the denoised estimate's channel mean, pooled to 8x8.
    """

    feature_source = "denoised-channel-mean"

    def __init__(
        self,
        weights: np.ndarray,
        means: np.ndarray,
        covs: np.ndarray,
        shape: tuple[int, int, int],
        *,
        name: str = "gmm",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        data_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        weights, means, covs = (_float_array(n, a) for n, a in (("weights", weights), ("means", means), ("covs", covs)))
        shape_arr = np.asarray(shape)
        if shape_arr.dtype.kind not in "iu" or shape_arr.size != 3 or np.any(shape_arr < 1) or np.any(shape_arr > 4096):
            raise ValueError(f"mixture field 'shape' must be three positive integers (C, H, W) up to 4096, got "
                             f"{shape_arr.reshape(-1)[:8].tolist()} ({shape_arr.dtype})")
        shape = tuple(int(s) for s in shape_arr.reshape(-1))
        if weights.ndim != 1 or weights.shape[0] < 1:
            raise ValueError(f"mixture field 'weights' must be a 1-D array with one weight per component, got shape "
                             f"{weights.shape}")
        K = weights.shape[0]
        D = int(np.prod(shape))
        if means.shape != (K, D) or covs.shape != (K, D, D):
            raise ValueError(
                f"mixture arrays disagree: weights {weights.shape}, means {means.shape} (want {(K, D)}), "
                f"covs {covs.shape} (want {(K, D, D)}) for shape {shape}"
            )
        if not np.all(weights > 0) or not math.isclose(weights.sum(), 1.0, rel_tol=1e-6):
            raise ValueError("mixture field 'weights' must be positive and sum to 1")
        covs = 0.5 * (covs + covs.transpose(0, 2, 1))
        evals, evecs = np.linalg.eigh(covs)
        if evals.min() < -1e-10:
            raise ValueError(f"covs must be positive semi-definite (smallest eigenvalue {evals.min():.3g})")
        evals = np.clip(evals, 0.0, None)
        self.name = name
        self.shape = shape
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.label_dim = 0
        self.data_range = None if data_range is None else check_data_range(data_range, "data_range")
        self.register_buffer("log_weights", torch.from_numpy(np.log(weights)))
        self.register_buffer("means", torch.from_numpy(means))
        self.register_buffer("evals", torch.from_numpy(evals))
        self.register_buffer("evecs", torch.from_numpy(evecs))
        h = hashlib.sha256()
        for a in (weights, means, covs, np.asarray(shape, dtype=np.int64)):
            h.update(np.ascontiguousarray(a).tobytes())
        self.content_hash = h.hexdigest()

    @classmethod
    def from_npz(cls, path: str | Path, **kwargs) -> "GaussianMixtureDenoiser":
        """Load a mixture file with ``weights``, ``means``, ``covs``, ``shape`` (no pickles).

        Anything else (a text file, a pickle, a ``.npy``, an object array, NaN/inf, wrong shapes) raises one
        ValueError naming the file and the field."""
        import zipfile

        need = ("weights", "means", "covs", "shape")
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except FileNotFoundError:
            raise ValueError(f"mixture file {path} does not exist (use gmm:PATH.npz with an existing file)") from None
        except (IsADirectoryError, PermissionError) as e:
            raise ValueError(f"mixture file {path} cannot be read ({e.strerror})") from None
        if magic[:4] != b"PK\x03\x04" and magic[:4] != b"PK\x05\x06":
            kind = "a .npy array" if magic[:4] == b"\x93NUM" else "not an .npz archive"
            raise ValueError(f"mixture file {path} is {kind}; it must be an .npz with arrays {', '.join(need)} "
                             "(np.savez(path, weights=..., means=..., covs=..., shape=...))")
        try:
            with np.load(path, allow_pickle=False) as d:
                missing = set(need) - set(d.files)
                if missing:
                    raise ValueError(f"mixture file {path} lacks {sorted(missing)}; it needs weights, means, covs, shape")
                arrays = {}
                for k in need:
                    try:
                        arrays[k] = d[k]
                    except ValueError:  # numpy's "Object arrays cannot be loaded when allow_pickle=False"
                        raise ValueError(f"mixture file {path}: field {k!r} is an object array (pickled data), which "
                                         "is never loaded; save it as numbers") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"mixture file {path} is not a readable .npz archive ({e})") from None
        kwargs.setdefault("name", f"gmm:{Path(path).name}")
        try:
            return cls(**arrays, **kwargs)
        except ValueError as e:
            raise ValueError(f"mixture file {path}: {e}") from None

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def num_components(self) -> int:
        return int(self.log_weights.shape[0])

    def identity(self) -> dict:
        return {"adapter": "gmm", "name": self.name, "content_sha256": self.content_hash, "shape": list(self.shape)}

    def _params(self, like: torch.Tensor):
        kw = dict(dtype=like.dtype, device=like.device)
        return self.log_weights.to(**kw), self.means.to(**kw), self.evals.to(**kw), self.evecs.to(**kw)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        logw, mu, lam, U = self._params(x)
        flat = x.reshape(B, -1)
        s2 = (sigma * sigma).reshape(B, 1, 1)                                   # (B, 1, 1)
        y = torch.einsum("bkd,kde->bke", flat[:, None, :] - mu[None], U)        # coordinates in each eigenbasis
        var = lam[None] + s2                                                    # (B, K, D) eigenvalues of C_k + s^2 I
        log_prob = -0.5 * ((y * y / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        g = torch.softmax(logw[None] + log_prob, dim=1)                         # (B, K) responsibilities
        shrunk = torch.einsum("bke,kde->bkd", y * (lam[None] / var), U)         # C_k (C_k + s^2 I)^-1 (x - mu_k)
        x0 = torch.einsum("bk,bkd->bd", g, mu[None] + shrunk).reshape(x.shape)
        self._emit_features(x0)
        return x0

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        """Exact samples x0 ~ p(x0), shape (n, C, H, W)."""
        logw, mu, lam, U = (t.to(dtype) for t in (self.log_weights, self.means, self.evals, self.evecs))
        k = torch.multinomial(logw.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype)
        x = mu[k] + torch.einsum("nde,ne->nd", U[k], lam[k].sqrt() * z)
        return x.reshape(n, *self.shape)
