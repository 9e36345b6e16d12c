"""k-diffusion's sampler signature for a sampler of any family: :func:`to_k_diffusion`.

k-diffusion's samplers (and ComfyUI's custom samplers, Forge's and A1111's, which call the same functions) are
``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None)``: ``model`` is a denoiser wrapper,
``model(x, sigma, **extra_args) -> denoised`` with ``sigma`` of shape (B,) (k-diffusion's
``external.DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser`` / ``VDenoiser`` / ``CompVisDenoiser``, ComfyUI's
model wrappers, or one of our own denoisers), ``x = noise * sigmas[0]``, and the sample at the last sigma is returned.
``to_k_diffusion(sampler)`` is such a function running the sampler (AMED, EPD, GITS, free; what ``load_sampler``
returns) on the wrapped model:

    sample = to_k_diffusion(load_sampler("models:/amed-digits-nfe5@champion"))
    x = sample(model, noise * sigmas[0], sigmas)             # sigmas = sampler_sigmas(sampler): its own time points

Where it departs from k-diffusion's own samplers, on purpose:

- The sampler runs on its own time points (:func:`sampler_sigmas`): its NFE and its score were measured there (AMED's
  predictor was trained for them). ``sigmas`` must be those points (rtol 1e-5, float32 lists pass); a trailing 0 is
  accepted and ignored: the result is the state at the last point, as ``load_sampler``'s, where k-diffusion's samplers
  would spend one more evaluation denoising to 0. Other sigmas raise ValueError naming ``sigmas`` and the fix.
- ``x`` is read as ``noise * sigmas[0]``: the sampler is given ``noise = x / sigmas[0]``.
- AMED reads an 8x8 feature map of the network's bottleneck at each step. A wrapper is a black box, so the module is
  found by the name the checkpoint records (``feature_source``, e.g. ``diffusers:mid_block``): the one module of the
  wrapper whose dotted name ends with it; none or several is an error naming ``feature_module`` (pass the module or
  its dotted name). Samplers trained on denoised-output features (the mixtures, wrap_model without a feature module)
  pool the wrapper's output; a wrapper that is one of our denoisers gives its own features.
- A wrapper that batches classifier-free guidance through the network (2B samples in the hooked module) has no
  conditional half we can know: pass ``cfg_features="first"`` or ``"second"`` (ours, diffusers': second).
- The teacher identity a checkpoint records cannot be checked through a black-box wrapper: running the champion on
  the model it was distilled for is the caller's part (``sample_with`` for diffusers pipelines checks it).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Mapping

import torch

from ..adapters.custom import pool_feature_map
from ..base_denoiser import BaseDenoiser, pool_features

__all__ = ["to_k_diffusion", "sampler_sigmas", "KDiffusionModel", "DENOISED_FEATURES"]

DENOISED_FEATURES = ("denoised", "denoised-channel-mean")  # feature sources read off the denoised output


def sampler_sigmas(sampler) -> torch.Tensor:
    """The sampler's own time points (N,), float64, decreasing, no trailing 0 (any family)."""
    return torch.as_tensor(sampler.spec.grid(), dtype=torch.float64).reshape(-1)


def _feature_source(sampler) -> str:
    """Where an AMED sampler reads its features (SamplerSpec.feature_source); '' for samplers without features."""
    if getattr(sampler, "predictor", None) is None:
        return ""
    return str(getattr(sampler.spec, "feature_source", "") or "denoised")


class KDiffusionModel(BaseDenoiser):
    """A k-diffusion-style wrapper ``model(x, sigma (B,), **extra_args) -> denoised`` in our denoiser protocol.

    ``feature_module``: the module whose output feeds AMED (None: features pooled from the denoised output);
    ``cfg_features``: which half of a 2B-batch feature map is the conditional one (None: refuse such a batch)."""

    def __init__(self, model: Callable, sigmas: torch.Tensor, *, extra_args: Mapping[str, Any] | None = None,
                 feature_module: torch.nn.Module | None = None, feature_name: str = "denoised",
                 feature_layout: str = "auto", cfg_features: str | None = None, shape=None) -> None:
        super().__init__()
        if cfg_features not in (None, "first", "second"):
            raise ValueError(f"cfg_features must be None, 'first' or 'second', got {cfg_features!r}")
        object.__setattr__(self, "model", model)  # not a submodule: the caller owns it (device, dtype, hooks)
        self.extra_args = dict(extra_args or {})
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self.shape = tuple(shape) if shape is not None else ()
        self._module = feature_module
        self.feature_source = f"k-diffusion:{feature_name}"
        self._feature_name, self._layout, self._cfg = feature_name, feature_layout, cfg_features
        self._batch: dict[int, int] = {}  # thread id -> its current batch size (threads may share this wrapper)
        self._own_taps = feature_module is None and isinstance(model, BaseDenoiser)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        self._batch[threading.get_ident()] = x.shape[0]
        out = self.model(x, sigma.to(x.dtype), **self.extra_args)
        if not torch.is_tensor(out) or out.shape != x.shape:
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"model returned {got} for x of shape {tuple(x.shape)}: a k-diffusion-style wrapper "
                             "returns the denoised sample, shaped like x")
        if self._module is None and not self._own_taps and self._capturing():
            value = pool_features(out.detach())
            self._deliver(value)
        return out

    def _feature_module(self):
        return self._module

    def _emit_features(self, feature_map) -> None:  # type: ignore[override]
        if not self._capturing():
            return
        value = pool_feature_map(feature_map, f"feature_module {self._feature_name!r}", self._layout)
        batch = self._batch.get(threading.get_ident(), 0)
        if value.shape[0] == 2 * batch:
            if self._cfg is None:
                raise ValueError(f"feature_module {self._feature_name!r} saw {value.shape[0]} samples for a batch of "
                                 f"{batch}: the wrapper batches classifier-free guidance; pass "
                                 "cfg_features='first' or 'second' (the conditional half)")
            value = value[batch:] if self._cfg == "second" else value[:batch]
        self._deliver(value)

    @contextlib.contextmanager
    def capture_features(self):
        if self._own_taps:  # one of our denoisers: its own features (and its own hooks)
            with self.model.capture_features() as tap:
                yield tap
        else:
            with super().capture_features() as tap:
                yield tap

    def identity(self) -> dict:
        return {"adapter": "k-diffusion", "name": type(self.model).__name__}  # no content hash: see the module doc


def _find_feature_module(model, source: str, feature_module):
    """(module or None, its name) for the sampler's feature source on ``model`` (see the module docstring)."""
    if feature_module is not None:
        if isinstance(feature_module, torch.nn.Module):
            return feature_module, type(feature_module).__name__
        if not isinstance(model, torch.nn.Module):
            raise ValueError("feature_module given by name needs the model to be a torch.nn.Module; pass the module")
        try:
            return model.get_submodule(str(feature_module)), str(feature_module)
        except AttributeError:
            raise ValueError(f"feature_module {feature_module!r} is not a module of {type(model).__name__}") from None
    if not source or source in DENOISED_FEATURES or isinstance(model, BaseDenoiser):
        return None, "denoised"
    layer = source.split(":", 1)[-1]
    hits = [(n, m) for n, m in model.named_modules() if n == layer or n.endswith("." + layer)] \
        if isinstance(model, torch.nn.Module) else []
    if len(hits) != 1:
        found = "is not a module of" if not hits else f"matches {len(hits)} modules ({', '.join(n for n, _ in hits[:4])}) of"
        raise ValueError(f"feature_module: this sampler reads its features from {source!r}, which {found} "
                         f"{type(model).__name__}; pass to_k_diffusion(sampler, feature_module=<the module, or its "
                         "dotted name in the wrapper>)")
    return hits[0][1], hits[0][0]


def _check_sigmas(sigmas, own: torch.Tensor) -> float:
    """sigmas[0] as a float after checking ``sigmas`` are the sampler's own points (a trailing 0 allowed)."""
    if sigmas is None:
        return float(own[0])
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).reshape(-1)
    if s.numel() == own.numel() + 1 and float(s[-1]) == 0.0:
        s = s[:-1]
    if s.numel() != own.numel() or not torch.allclose(s, own, rtol=1e-5, atol=0):
        shown = ", ".join(f"{v:.4g}" for v in own.tolist())
        raise ValueError(f"sigmas: this sampler runs on its own {own.numel()} time points ({shown}), not the "
                         f"{s.numel()} given; pass sampler_sigmas(sampler) (a trailing 0 is allowed), e.g. the SIGMAS "
                         "of the example ComfyUI node or `amed export URI --to sigmas.json`")
    return float(s[0])


def to_k_diffusion(sampler, *, feature_module: torch.nn.Module | str | None = None, feature_layout: str = "auto",
                   cfg_features: str | None = None) -> Callable:
    """``sample(model, x, sigmas=None, extra_args=None, callback=None, disable=None) -> x`` running ``sampler`` (any
    family) on a k-diffusion-style denoiser wrapper; see the module docstring for the conventions.

    ``callback`` receives k-diffusion's dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` after each step
    (``denoised`` is None on an AFS step, which makes no evaluation); ``disable`` is accepted and unused (no
    progress bar of our own)."""
    own = sampler_sigmas(sampler)
    source = _feature_source(sampler)

    def sample(model, x: torch.Tensor, sigmas=None, extra_args: Mapping[str, Any] | None = None,
               callback: Callable | None = None, disable: bool | None = None, **options) -> torch.Tensor:
        if options:
            raise ValueError(f"options {sorted(options)}: a distilled sampler's settings are fixed in its checkpoint; "
                             "call it without them")
        s0 = _check_sigmas(sigmas, own)
        module, name = _find_feature_module(model, source, feature_module)
        den = KDiffusionModel(model, own, extra_args=extra_args, feature_module=module, feature_name=name,
                              feature_layout=feature_layout, cfg_features=cfg_features, shape=x.shape[1:])
        if hasattr(sampler, "predictor"):
            sampler.predictor.to(x.device)
        cb = None
        if callback is not None:
            def cb(info):
                t = torch.as_tensor(info.t_cur, dtype=x.dtype, device=x.device)
                callback({"x": info.x, "i": info.i, "sigma": t, "sigma_hat": t, "denoised": info.denoised})
        return sampler(den, x / s0, callback=cb).x

    sample.__name__ = "sample_amed"
    sample.__doc__ = f"k-diffusion sampler running {type(sampler).__name__} on its {own.numel()} time points."
    return sample
