"""The denoiser protocol (EDM form): :class:`BaseDenoiser` and the AMED feature tap.

A denoiser is any ``torch.nn.Module`` with ``forward(x, sigma, class_labels=None) -> x0_hat``
in the EDM convention (Karras et al. 2022): ``D(x; sigma) ~= E[x0 | x0 + sigma * n = x]``.
Solvers only ever see this protocol; model adapters convert other parameterizations once.

AMED needs a per-sample feature vector from the evaluation at ``t_cur``. Every denoiser offers
``capture_features()``: a context manager yielding a :class:`FeatureTap` whose ``value`` holds
a ``(B, 8, 8)`` tensor after the next call (the channel mean of the chosen feature map, pooled
to 8x8). Neural adapters fill it from a forward hook on their bottleneck block; the mixture fills
it with a documented stand-in (the channel mean of the denoised estimate, pooled to 8x8).

Taps belong to the thread that opened them: an evaluation fills only the taps its own thread holds, so threads that
share one denoiser (the registry logs candidates so) never read each other's features. The reference samples on one
thread and has no such notion.

The denoisers themselves live in :mod:`amed_core.adapters` (the exact mixture in ``adapters/gmm.py``), with
``load_teacher``; :mod:`amed_core.denoisers` gathers the whole API in one import.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = [
    "BaseDenoiser",
    "FeatureTap",
    "as_sigma",
    "check_data_range",
    "pool_features",
    "FEATURE_SIZE",
]

FEATURE_SIZE = 8  # AMED features are (B, 8, 8) maps
_TAP_LOCK = threading.Lock()  # one for all denoisers: a lock attribute would make them unpicklable (Ray ships them)


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


def check_data_range(value, field: str = "data_range") -> tuple[float, float]:
    """``(low, high)`` of a model's data, two finite floats with low < high; ValueError naming ``field`` otherwise."""
    import math

    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be (low, high), two numbers, e.g. (-1, 1) for images scaled to [-1, 1]; "
                         f"got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{field} must be two finite numbers with low < high, e.g. (-1, 1); got {value!r}")
    return low, high


@dataclass(eq=False)  # taps are removed by identity: == on two taps would compare their tensors (a CI crash)
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
    # (low, high) of the model's data, when the model declares it (None: unknown; amed_core.adapters.data_range
    # measures it). Dynamic thresholding is on by default only for data inside [-1, 1].
    data_range: tuple[float, float] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._taps: dict[int, list[FeatureTap]] = {}  # thread id -> the open capture blocks of that thread
        self._tap_hook = None  # the forward hook on _feature_module(), while any thread captures

    # -- protocol -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(x, as_sigma(sigma, x), class_labels)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> dict:
        """A JSON-able description naming this model, with a content hash of its parameters."""
        raise NotImplementedError(
            f"{type(self).__name__} has no identity(): checkpoints record which model a sampler was trained for. "
            "Wrap the model with amed_core.adapters.wrap_model(net, ..., identity='name@version'), or implement "
            "identity() returning {'adapter': ..., 'name': ..., 'content_sha256': amed_core.adapters.content_sha256(net)}")

    # -- AMED features --------------------------------------------------------------------------
    def _feature_module(self) -> torch.nn.Module | None:
        """The module whose output feeds AMED (None: the subclass emits features itself)."""
        return None

    def _capturing(self) -> list[FeatureTap]:
        """The calling thread's open taps (empty: nobody on this thread wants features; skip the pooling)."""
        return self._taps.get(threading.get_ident(), [])

    def _deliver(self, value: torch.Tensor) -> None:
        """Hand pooled features to the calling thread's taps (another thread's evaluation never reaches them)."""
        for tap in self._capturing():
            tap.value = value

    def _emit_features(self, feature_map: torch.Tensor) -> None:
        if self._capturing():
            self._deliver(pool_features(feature_map.detach()))

    @contextlib.contextmanager
    def capture_features(self) -> Iterator[FeatureTap]:
        """Record AMED features of the evaluations this thread makes inside the block; the hook is removed when the
        last block (of any thread) ends."""
        tap, me = FeatureTap(), threading.get_ident()
        with _TAP_LOCK:
            module = self._feature_module()
            if module is not None and self._tap_hook is None:  # one hook, whatever the number of open blocks
                self._tap_hook = module.register_forward_hook(lambda _m, _i, out: self._emit_features(out))
            self._taps.setdefault(me, []).append(tap)
        try:
            yield tap
        finally:
            with _TAP_LOCK:
                mine = self._taps[me]
                mine.remove(tap)
                if not mine:
                    del self._taps[me]
                if not self._taps and self._tap_hook is not None:
                    self._tap_hook.remove()
                    self._tap_hook = None
