"""Denoiser protocol (EDM form) and the exact Gaussian-mixture denoiser.

A denoiser is any ``torch.nn.Module`` with ``forward(x, sigma, class_labels=None) -> x0_hat``
in the EDM convention (Karras et al. 2022): ``D(x; sigma) ~= E[x0 | x0 + sigma * n = x]``.
Solvers only ever see this protocol; model adapters convert other parameterizations once.

AMED needs a per-sample feature vector from the evaluation at ``t_cur``. Every denoiser offers
``capture_features()``: a context manager yielding a :class:`FeatureTap` whose ``value`` holds
a ``(B, 8, 8)`` tensor after the next call (the channel mean of the chosen feature map, pooled
to 8x8). Neural adapters fill it from a forward hook on their bottleneck block; the mixture fills
it with a documented stand-in (the channel mean of the denoised estimate, pooled to 8x8).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BaseDenoiser",
    "FeatureTap",
    "GaussianMixtureDenoiser",
    "as_sigma",
    "pool_features",
    "FEATURE_SIZE",
]

FEATURE_SIZE = 8  # AMED features are (B, 8, 8) maps


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return sigma as a ``(B,)`` tensor in x's dtype/device (scalar, (B,) or (B,1,1,1) accepted)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] == 1:
        return sigma.expand(x.shape[0])
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} entries but the batch has {x.shape[0]} samples")
    return sigma


def pool_features(feature_map: torch.Tensor, size: int = FEATURE_SIZE) -> torch.Tensor:
    """AMED's per-sample input: channel mean of a (B, C, H, W) map, average-pooled to (B, size, size)."""
    m = feature_map.mean(dim=1, keepdim=True)
    if m.shape[-2:] != (size, size):
        m = F.adaptive_avg_pool2d(m, size)
    return m[:, 0]


@dataclass
class FeatureTap:
    """Receives the AMED features of the next denoiser evaluation (detached, (B, 8, 8))."""

    value: torch.Tensor | None = None


class BaseDenoiser(torch.nn.Module):
    """Common base: protocol attributes, sigma normalisation and the feature-capture plumbing.

    Subclasses implement :meth:`denoise` (sigma already a ``(B,)`` tensor) and either call
    :meth:`_emit_features` themselves or implement :meth:`_feature_module` for a forward hook.
    """

    sigma_min: float
    sigma_max: float
    shape: tuple[int, int, int]
    label_dim: int = 0
    feature_source: str = "denoised"

    def __init__(self) -> None:
        super().__init__()
        self._taps: list[FeatureTap] = []

    # -- protocol -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(x, as_sigma(sigma, x), class_labels)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> dict:
        """A JSON-able description naming this model, with a content hash of its parameters."""
        raise NotImplementedError

    # -- AMED features --------------------------------------------------------------------------
    def _feature_module(self) -> torch.nn.Module | None:
        """The module whose output feeds AMED (None: the subclass emits features itself)."""
        return None

    def _emit_features(self, feature_map: torch.Tensor) -> None:
        if self._taps:
            value = pool_features(feature_map.detach())
            for tap in self._taps:
                tap.value = value

    @contextlib.contextmanager
    def capture_features(self) -> Iterator[FeatureTap]:
        """Record AMED features of the evaluations made inside the block; hooks are always removed."""
        tap = FeatureTap()
        module = self._feature_module()
        handle = None
        if module is not None:
            handle = module.register_forward_hook(lambda _m, _i, out: self._emit_features(out))
        self._taps.append(tap)
        try:
            yield tap
        finally:
            self._taps.remove(tap)
            if handle is not None:
                handle.remove()


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
    ) -> None:
        super().__init__()
        weights = np.asarray(weights, dtype=np.float64)
        means = np.asarray(means, dtype=np.float64)
        covs = np.asarray(covs, dtype=np.float64)
        shape = tuple(int(s) for s in np.asarray(shape).reshape(-1))
        K = weights.shape[0]
        D = int(np.prod(shape))
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        if means.shape != (K, D) or covs.shape != (K, D, D):
            raise ValueError(
                f"mixture arrays disagree: weights {weights.shape}, means {means.shape} (want {(K, D)}), "
                f"covs {covs.shape} (want {(K, D, D)}) for shape {shape}"
            )
        if not np.all(weights > 0) or not math.isclose(weights.sum(), 1.0, rel_tol=1e-6):
            raise ValueError("weights must be positive and sum to 1")
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
        """Load a mixture file with ``weights``, ``means``, ``covs``, ``shape`` (no pickles)."""
        try:
            with np.load(path, allow_pickle=False) as d:
                missing = {"weights", "means", "covs", "shape"} - set(d.files)
                if missing:
                    raise ValueError(f"mixture file {path} lacks {sorted(missing)}; it needs weights, means, covs, shape")
                arrays = {k: d[k] for k in ("weights", "means", "covs", "shape")}
        except FileNotFoundError:
            raise ValueError(f"mixture file {path} does not exist (use gmm:PATH.npz with an existing file)") from None
        kwargs.setdefault("name", f"gmm:{Path(path).name}")
        return cls(**arrays, **kwargs)

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


def _builtin_path(name: str) -> Path:
    return Path(str(resources.files("amed_core") / "data" / name))


BUILTIN_TEACHERS = {
    "digits-gmm": "digits.npz",
}


def load_teacher(spec: str, **kwargs) -> BaseDenoiser:
    """Resolve a teacher name: ``digits-gmm`` (built in), ``gmm:PATH.npz`` (any mixture file), or a real network
    (``digits-tiny-unet``, ``tiny-unet:DIR``, ``edm-safetensors:DIR``, ``edm:PATH.pkl``, ``diffusers:PATH_OR_ID``;
    see :mod:`amed_core.adapters`), keyword options forwarded (e.g. ``trust_pickle``, ``guidance_scale``, ``prompts``)."""
    if spec in BUILTIN_TEACHERS:
        return GaussianMixtureDenoiser.from_npz(_builtin_path(BUILTIN_TEACHERS[spec]), name=spec, **kwargs)
    if spec.startswith("gmm:"):
        return GaussianMixtureDenoiser.from_npz(spec[4:], **kwargs)
    from . import adapters  # real networks: tiny-unet:DIR, edm-safetensors:DIR, edm:PKL, diffusers:PATH_OR_ID

    if spec in adapters.BUILTIN_NETWORKS or spec.partition(":")[0] in adapters.TEACHER_PREFIXES:
        return adapters.load_adapter(spec, **kwargs)
    raise ValueError(
        f"unknown teacher {spec!r}: use one of {sorted(BUILTIN_TEACHERS) + sorted(adapters.BUILTIN_NETWORKS)}, gmm:PATH.npz "
        f"(a mixture file with weights, means, covs, shape) or {sorted(p + ':...' for p in adapters.TEACHER_PREFIXES)}"
    )
