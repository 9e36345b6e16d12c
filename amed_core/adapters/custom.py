"""Bring your own model: any torch callable as an AMED teacher, without subclassing.

    from amed_core.adapters import VPTime, wrap_model
    teacher = wrap_model(net, parameterization="score", sigma_min=0.01, sigma_max=80.0, shape=(1, 8, 8),
                         vp=VPTime(beta_min=0.1, beta_d=19.9), feature_module="blocks.1", identity="my-model@v1")

``net(x_in, t)`` (or ``net(x_in, t, class_labels)`` when ``label_dim > 0``) is the model in its own convention; the
wrapper turns it into the EDM-form denoiser every solver expects (:class:`amed_core.base_denoiser.BaseDenoiser`,
``D(x; sigma) ~= E[x0 | x0 + sigma n = x]``):

=================  ===================================================================================
parameterization   what ``net`` returns (``x_in``: its input, ``std``: the noise level of ``x_in``)
=================  ===================================================================================
``"x0"``           the clean sample
``"eps"``          the noise: ``x_in = a x0 + std eps``
``"v"``            ``v = a eps - std x0`` (VP input scaling needed: ``vp=`` or ``input_scaling="vp"``)
``"score"``        ``grad log p(x_in)`` at the model's noise level (``-eps / std``)
=================  ===================================================================================

Time and input: with ``vp=VPTime(...)`` the model sees VP inputs ``x_in = x / sqrt(1 + sigma^2)`` (``a`` =
``1/sqrt(1+sigma^2)``, ``std = sigma a``) and its own time ``t(sigma) * vp.time_scale`` (Song et al.'s VP-SDE:
``sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1``); without it, ``x_in = x`` (``a = 1``, ``std = sigma``) and the
time is ``sigma`` (or ``time_fn(sigma)``). AMED's features come from ``feature_module`` (a submodule or its dotted
name in ``net``) through :func:`pool_feature_map` (``(B, C, H, W)`` maps and ``(B, T, C)`` / ``(B, C, T)`` tokens);
without one, from the denoised estimate (as the analytic mixture does).

Identity: ``identity="name@version"`` names the model in every checkpoint and registry entry; the content hash of
``net``'s parameters and buffers (:func:`content_sha256`) is added, so a sampler refuses another model's weights.

In a sweep: ``teacher: "py:mypkg.models:build"`` (with ``options:`` passed to ``build``) imports ``mypkg.models`` and
calls ``build(**options)``, which returns ``wrap_model(...)``. **Importing runs that module's code**, on this machine
and on every Ray worker: name only modules you trust, as you would ``import`` them yourself.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..base_denoiser import FEATURE_SIZE, BaseDenoiser, check_data_range, pool_features
from ._common import first_tensor, module_dtype, state_dict_sha256

__all__ = ["PARAMETERIZATIONS", "VPTime", "CustomDenoiser", "wrap_model", "content_sha256", "cast_like", "to_dtype",
           "pool_feature_map", "load_callable", "load_py_teacher"]

PARAMETERIZATIONS = ("x0", "eps", "v", "score")


@dataclass(frozen=True)
class VPTime:
    """Song et al.'s VP-SDE time: ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``; the model is called with
    ``t(sigma) * time_scale`` (e.g. 999 for a model trained on discrete steps 0..999 scaled to [0, 1]).

    ``beta_d = 0`` is the constant-beta VP (``sigma(t)^2 = exp(beta_min t) - 1``): :meth:`t` uses the rationalised
    inverse ``2 L / (sqrt(beta_min^2 + 2 beta_d L) + beta_min)``, ``L = log(1 + sigma^2)``, which equals the usual
    ``(sqrt(beta_min^2 + 2 beta_d L) - beta_min) / beta_d`` and stays finite there (the usual form is 0/0 = NaN).
    The parameters are checked: finite, ``beta_min >= 0``, ``beta_d >= 0``, not both 0, ``time_scale > 0``."""

    beta_min: float = 0.1
    beta_d: float = 19.9
    time_scale: float = 1.0

    def __post_init__(self):
        for name in ("beta_min", "beta_d", "time_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"VPTime.{name} must be a finite number, got {v!r}")
        if self.beta_min < 0 or self.beta_d < 0:
            raise ValueError(f"VPTime needs beta_min >= 0 and beta_d >= 0 (got beta_min={self.beta_min}, "
                             f"beta_d={self.beta_d}); the usual VP-SDE is beta_min=0.1, beta_d=19.9")
        if self.beta_min == 0 and self.beta_d == 0:
            raise ValueError("VPTime: beta_min and beta_d are both 0, so sigma(t) = 0 for every t (no noise); the usual "
                             "VP-SDE is beta_min=0.1, beta_d=19.9")
        if not self.time_scale > 0:
            raise ValueError(f"VPTime.time_scale must be positive (e.g. 1, or 999 for discrete steps), got {self.time_scale}")

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t))

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        L = torch.log1p(sigma ** 2)
        return 2 * L / (torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * L) + self.beta_min)

    def to_dict(self) -> dict:
        return {"beta_min": self.beta_min, "beta_d": self.beta_d, "time_scale": self.time_scale}


# -------------------------------------------------------------------------------------------------
# Public helpers (what the built-in adapters do for themselves).

def content_sha256(obj: Union[torch.nn.Module, bytes, str, dict]) -> str:
    """SHA-256 naming a model's content: of a module's parameters and buffers (name, dtype, shape, bytes; independent
    of the file format), of raw bytes, of a file path's bytes, or of a state dict."""
    if isinstance(obj, torch.nn.Module):
        return state_dict_sha256(obj)
    if isinstance(obj, bytes):
        return hashlib.sha256(obj).hexdigest()
    if isinstance(obj, str):
        h = hashlib.sha256()
        with open(obj, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if isinstance(obj, dict):
        holder = torch.nn.Module()
        for i, (name, t) in enumerate(sorted(obj.items())):
            holder.register_buffer(f"t{i}", torch.as_tensor(t))
        return state_dict_sha256(holder)
    raise TypeError(f"content_sha256 takes a module, bytes, a file path or a state dict, not {type(obj).__name__}")


def to_dtype(module_or_dtype, *tensors: Optional[torch.Tensor]):
    """``tensors`` cast to a module's parameter dtype (or the dtype given) and its device; None stays None. Solvers
    run in float64, networks usually in float32 / bfloat16: cast on the way in, :func:`cast_like` on the way out."""
    if isinstance(module_or_dtype, torch.dtype):
        dtype, device = module_or_dtype, None
    else:
        dtype = module_dtype(module_or_dtype)
        device = next((p.device for p in module_or_dtype.parameters()), None)
    out = tuple(None if t is None else t.to(dtype=dtype if t.is_floating_point() else t.dtype, device=device)
                for t in tensors)
    return out[0] if len(out) == 1 else out


def cast_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s dtype and device (a network's output back into the solver's float64)."""
    return t.to(dtype=like.dtype, device=like.device)


def pool_feature_map(out, layer: str = "feature layer", layout: str = "auto", size: int = FEATURE_SIZE) -> torch.Tensor:
    """A layer's output as AMED's ``(B, size, size)`` features (detached, float32).

    ``layout``: ``"bchw"`` (conv maps), ``"btc"`` (tokens x channels, T a square number), ``"bct"`` (channels x tokens),
    ``"bd"`` (a flat vector per sample, D a square number) or ``"auto"`` (4-D: bchw; 3-D: btc if only the middle axis is
    a square number, bct if only the last one is; 2-D: bd). A 3-D output whose two axes are both square numbers (e.g.
    (B, 64, 16): 64 tokens of 16 channels, or 16 tokens of 64?) is ambiguous and refused under ``"auto"``: say which
    with ``feature_layout``. Tuple outputs and ``.sample`` attributes are unwrapped. A shape that cannot be pooled raises
    ValueError naming ``layer``."""
    try:
        x = first_tensor(out)
    except ValueError:
        raise ValueError(f"{layer} returned {type(out).__name__}, not a tensor: choose another feature layer") from None
    x = x.detach().float()

    def square(n: int) -> Optional[int]:
        r = math.isqrt(n)
        return r if r * r == n else None

    if layout == "auto":
        if x.ndim == 4:
            layout = "bchw"
        elif x.ndim == 3:
            if square(x.shape[1]) and square(x.shape[2]):
                raise ValueError(f"{layer} gives features of shape {tuple(x.shape)}: both {x.shape[1]} and {x.shape[2]} "
                                 "are square numbers, so they could be tokens x channels or channels x tokens; pass "
                                 "feature_layout='btc' (B, tokens, channels) or 'bct' (B, channels, tokens) to wrap_model")
            layout = "btc" if square(x.shape[1]) else "bct" if square(x.shape[2]) else "?"
        elif x.ndim == 2:
            layout = "bd"
        else:
            layout = "?"
    if layout == "?" or (layout == "bchw" and x.ndim != 4) or (layout in ("btc", "bct") and x.ndim != 3) or \
            (layout == "bd" and x.ndim != 2):
        raise ValueError(f"{layer} gives features of shape {tuple(x.shape)}: AMED needs (B, C, H, W) maps, (B, T, C) or "
                         f"(B, C, T) tokens with T a square number, or (B, D) with D a square number; choose another "
                         f"feature layer or pass feature_layout")
    if layout == "btc":
        x = x.transpose(1, 2)
        layout = "bct"
    if layout == "bct":
        side = square(x.shape[2])
        if side is None:
            raise ValueError(f"{layer} gives {x.shape[2]} tokens per sample (shape {tuple(x.shape)}), not a square "
                             "number: the tokens cannot be laid out on a grid for AMED's 8x8 features")
        x = x.reshape(x.shape[0], x.shape[1], side, side)
    elif layout == "bd":
        side = square(x.shape[1])
        if side is None:
            raise ValueError(f"{layer} gives flat features of size {x.shape[1]} (not a square number): AMED needs a map")
        x = x.reshape(x.shape[0], 1, side, side)
    elif layout != "bchw":
        raise ValueError(f"feature_layout must be auto, bchw, btc, bct or bd, got {layout!r}")
    return pool_features(x, size)


# -------------------------------------------------------------------------------------------------
# The wrapper.

class CustomDenoiser(BaseDenoiser):
    """An EDM-form denoiser around any callable (see the module docstring); build it with :func:`wrap_model`."""

    def __init__(self, net: Callable, *, parameterization: str, sigma_min: float, sigma_max: float,
                 shape: Sequence[int], identity: str, feature_module=None, feature_layout: str = "auto",
                 vp: Optional[VPTime] = None, input_scaling: Optional[str] = None,
                 time_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, label_dim: int = 0,
                 dtype: Optional[torch.dtype] = None, data_range: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.data_range = None if data_range is None else check_data_range(data_range, "data_range")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if not isinstance(identity, str) or not identity.strip():
            raise ValueError("identity must name the model and its version, e.g. identity='my-model@v1' (it is stored "
                             "in every checkpoint and registry entry)")
        if not (0 < float(sigma_min) < float(sigma_max)):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {shape}")
        input_scaling = input_scaling or ("vp" if vp is not None else "none")
        if input_scaling not in ("vp", "none"):
            raise ValueError(f"input_scaling must be 'vp' or 'none', got {input_scaling!r}")
        if parameterization == "v" and input_scaling != "vp":
            raise ValueError("parameterization 'v' is defined on VP inputs: pass vp=VPTime(...) or input_scaling='vp'")
        if vp is not None and time_fn is not None:
            raise ValueError("pass vp= (VP time) or time_fn= (your own sigma -> model time), not both")
        if isinstance(net, torch.nn.Module):
            self.net = net
        else:
            if not callable(net):
                raise TypeError(f"net must be a torch module or a callable, got {type(net).__name__}")
            self._fn = net
        self.parameterization, self.vp, self.input_scaling, self.time_fn = parameterization, vp, input_scaling, time_fn
        self.sigma_min, self.sigma_max, self.shape, self.label_dim = float(sigma_min), float(sigma_max), shape, int(label_dim)
        self.name = identity.strip()
        self.dtype = dtype
        self.feature_layout = feature_layout
        self._feature = None
        if feature_module is not None:
            if isinstance(feature_module, str):
                if not isinstance(net, torch.nn.Module):
                    raise ValueError("feature_module given by name needs net to be a torch.nn.Module")
                try:
                    self._feature = net.get_submodule(feature_module)
                except AttributeError:
                    names = [n for n, _ in net.named_modules() if n][:12]
                    raise ValueError(f"feature_module {feature_module!r} is not a module of {type(net).__name__} "
                                     f"(some that are: {names})") from None
                self.feature_source = f"custom:{feature_module}"
            elif isinstance(feature_module, torch.nn.Module):
                self._feature = feature_module
                owner = next((n for n, m in net.named_modules() if m is feature_module), None) \
                    if isinstance(net, torch.nn.Module) else None
                self.feature_source = f"custom:{owner or type(feature_module).__name__}"
            else:
                raise TypeError("feature_module must be a torch.nn.Module or its dotted name in net")
        else:
            self.feature_source = "denoised"
        self._feature_name = self.feature_source.removeprefix("custom:")
        self._positional_labels = self.label_dim > 0

    # -- the model's own convention -> EDM form ---------------------------------------------------
    def _call(self, x_in: torch.Tensor, t: torch.Tensor, class_labels):
        fn = self.net if hasattr(self, "net") else self._fn
        if self._positional_labels:
            return fn(x_in, t, class_labels)
        return fn(x_in, t)

    def model_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The time argument the model is called with for noise level ``sigma`` ((B,))."""
        if self.vp is not None:
            return self.vp.t(sigma) * self.vp.time_scale
        if self.time_fn is not None:
            return self.time_fn(sigma)
        return sigma

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        a = torch.rsqrt(1 + s ** 2) if self.input_scaling == "vp" else torch.ones_like(s)
        std = s * a
        x_in = a * x
        t = self.model_time(sigma.to(x.dtype))
        net_dtype = self.dtype or (module_dtype(self.net) if hasattr(self, "net") else x.dtype)
        x_m, t_m = to_dtype(net_dtype, x_in, t)
        out = self._call(x_m, t_m, class_labels)
        if not torch.is_tensor(out) or tuple(out.shape) != tuple(x.shape):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"model {self.name!r} returned {got} for input {tuple(x.shape)}: a "
                             f"{self.parameterization!r} model must return a tensor shaped like its input")
        out = cast_like(out, x)
        if self.parameterization == "x0":
            x0 = out
        elif self.parameterization == "eps":
            x0 = x - s * out
        elif self.parameterization == "score":  # score of x_in at noise std: eps = -std * score
            x0 = x + s * std * out
        else:  # v on VP inputs: x0 = a x_in - std v
            x0 = a * x_in - std * out
        if self._feature is None and self._capturing():
            self._emit_features(x0)
        return x0

    # -- features --------------------------------------------------------------------------------
    def _feature_module(self):
        return self._feature

    def _emit_features(self, feature_map) -> None:
        if self._capturing():
            value = pool_feature_map(feature_map, f"feature_module {self._feature_name!r}", self.feature_layout)
            self._deliver(value)

    # -- identity --------------------------------------------------------------------------------
    def identity(self) -> dict:
        ident = {"adapter": "custom", "name": self.name, "parameterization": self.parameterization,
                 "shape": list(self.shape), "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
        if self.vp is not None:
            ident["vp"] = self.vp.to_dict()
        if hasattr(self, "net"):
            from ._common import cached_state_dict_sha256

            ident["content_sha256"] = cached_state_dict_sha256(self, self.net)
        return ident


def wrap_model(net: Callable, *, parameterization: str = "x0", sigma_min: float, sigma_max: float,
               shape: Sequence[int], identity: str, feature_module=None, feature_layout: str = "auto",
               vp: Union[VPTime, dict, bool, None] = None, input_scaling: Optional[str] = None,
               time_fn: Optional[Callable] = None, label_dim: int = 0, dtype: Optional[torch.dtype] = None,
               data_range: Optional[Sequence[float]] = None) -> CustomDenoiser:
    """Any torch callable -> an AMED teacher (see the module docstring). ``vp=True`` means ``VPTime()``; a dict gives
    its fields. The wrapper is a ``torch.nn.Module`` (``.to(device)`` moves ``net``). ``data_range=(low, high)``
    declares the range of the model's data (e.g. (-1, 1)); undeclared, a sweep measures it
    (:mod:`amed_core.data_range`) to decide whether DPM-Solver++ / UniPC threshold by default."""
    if vp is True:
        vp = VPTime()
    elif isinstance(vp, dict):
        vp = VPTime(**vp)
    elif vp is False:
        vp = None
    return CustomDenoiser(net, parameterization=parameterization, sigma_min=sigma_min, sigma_max=sigma_max,
                          shape=shape, identity=identity, feature_module=feature_module, feature_layout=feature_layout,
                          vp=vp, input_scaling=input_scaling, time_fn=time_fn, label_dim=label_dim, dtype=dtype,
                          data_range=data_range)


# -------------------------------------------------------------------------------------------------
# Sweep teachers by import path: "py:package.module:function".

def load_callable(path: str) -> Callable:
    """``package.module:attr`` (``attr`` may be dotted) -> the object. Importing runs the module's code."""
    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"teacher import path must be 'py:package.module:function', got 'py:{path}'")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"teacher py:{path}: cannot import {mod_name!r} ({e}); is it on PYTHONPATH (every Ray worker "
                         "needs it too)?") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"teacher py:{path}: {mod_name} has no attribute {attr!r}") from None
    return obj


def load_py_teacher(path: str, **options) -> BaseDenoiser:
    """``py:`` teachers: import ``package.module``, call ``function(**options)``; it must return a denoiser
    (``wrap_model(...)`` or a ``BaseDenoiser``) with ``identity()``. Trust note: importing runs the module's code."""
    fn = load_callable(path)
    if not callable(fn):
        raise ValueError(f"teacher py:{path} is not callable")
    try:
        inspect.signature(fn).bind(**options)
    except TypeError as e:
        raise ValueError(f"teacher py:{path}: options {sorted(options)} do not fit {fn.__name__}{inspect.signature(fn)} "
                         f"({e})") from None
    except ValueError:
        pass  # no signature (builtins): let the call say
    den = fn(**options)
    missing = [a for a in ("sigma_min", "sigma_max", "shape") if getattr(den, a, None) is None]
    if not isinstance(den, torch.nn.Module) or missing or not callable(getattr(den, "capture_features", None)):
        raise ValueError(f"teacher py:{path} returned {type(den).__name__}: it must return a denoiser "
                         "(amed_core.adapters.wrap_model(...) or a BaseDenoiser)"
                         + (f"; missing {missing}" if missing else ""))
    try:
        den.identity()
    except NotImplementedError:
        raise ValueError(f"teacher py:{path} returned a denoiser without identity(): wrap it with "
                         "wrap_model(..., identity='name@version') or implement identity()") from None
    return den
