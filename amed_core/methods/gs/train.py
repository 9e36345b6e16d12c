"""Training GS on the teacher's final samples, and its checkpoint tensors.

GS is supervised by the final sample only: for a noise draw, the teacher's endpoint from the same noise (the reference's
``SyntDataset``: pairs of noise and teacher image). So it needs the stored teacher's noise and last state, not a grid of
intermediate states; a teacher that stores only its two end points is enough (:mod:`amed_core.families.gs`).

:func:`train_gs` follows the reference's ``main.py`` / ``training.py`` (``configs/edm/cifar10.yaml``) by default
(:class:`GSTrainConfig`): Adam lr 1e-3 (betas 0.9 / 0.999, no schedule), gradient norm clipped to 1.0, an exponential
moving average of the parameters (decay 0.999 with torch_ema's warm-up min(decay, (1 + n) / (10 + n))), batches of 24
drawn without replacement per epoch (drop_last), 10,000 iterations, a validation pass every 500 iterations (and at the
first) with the EMA parameters. Where we depart:

- **Loss**: the reference's GS loss is LPIPS (VGG) on images upsampled to 224 (``loss_key: loss_lpips``); LPIPS needs
  weights we cannot download here, so the default is its ``loss_l2`` (per-sample mean squared error, batch mean) and a
  feature distance is pluggable: ``distance=`` any callable (student, teacher) -> (B,) per-sample distances, e.g.
  :class:`FeatureDistance` around a local network, or an ``lpips.LPIPS`` module of your own.
- **Validation keeps the best checkpoint**: the reference only logs its validation loss (a person picks a checkpoint);
  here the EMA parameters with the lowest validation loss are returned (``keep="best"``; ``"last"``: the final EMA).
- **A step whose loss or gradient is not finite is skipped** (counted in ``skipped``); the reference would take it.
- The adversarial variant (GAS: a discriminator loss next to the distillation loss) is not implemented.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..._fields import check_fields
from ...optim import Adam
from .sampler import GSConfig, GSParams, gs_sample

__all__ = ["GSTrainConfig", "GSTrainProgress", "GSTrainResult", "EMA", "FeatureDistance", "clip_grad_norm",
           "l2_distance", "train_gs", "validation_loss", "gs_tensor_bytes", "gs_tensors_from_bytes", "GS_TENSOR_FILE"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class GSTrainConfig:
    """How to fit GS (frozen; JSON round-trip with to_dict / from_dict). Defaults: the reference's
    ``configs/edm/cifar10.yaml`` (``training`` and ``dataset`` sections) and ``main.py``.

    iterations: optimiser steps (n_iters 10,000); batch_size: 24; lr, beta1, beta2, eps: Adam (1e-3, torch's
    defaults); grad_clip: max gradient norm (1.0; 0 = off); ema_decay (0.999), ema_warmup (torch_ema's use_num_updates:
    True); eval_every: validation every this many iterations and at the first and last (500); val_batch_size (128);
    keep: "best" (lowest validation loss of the EMA parameters) or "last"; loss: "l2" or the name of the user's distance
    (recorded; the callable is passed to :func:`train_gs`); seed: the shuffling of the training pairs; dtype: the
    student's arithmetic ("float32" / "float64" / None = the data's).
    """

    iterations: int = 10000
    batch_size: int = 24
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    eval_every: int = 500
    val_batch_size: int = 128
    keep: str = "best"
    loss: str = "l2"
    seed: int = 0
    dtype: Optional[str] = None

    def __post_init__(self):
        for name in ("iterations", "batch_size", "eval_every", "val_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name, ok, what in (("lr", lambda v: v > 0, "> 0"), ("eps", lambda v: v > 0, "> 0"),
                               ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
                               ("grad_clip", lambda v: v >= 0, ">= 0 (0: no clipping)"),
                               ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be a number {what}, got {v!r}")
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if not isinstance(self.loss, str) or not self.loss:
            raise ValueError(f"loss must name the distance ('l2' or your feature distance), got {self.loss!r}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        if not isinstance(self.ema_warmup, bool):
            raise ValueError(f"ema_warmup must be true or false, got {self.ema_warmup!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "GSTrainConfig":
        check_fields(cls, d)
        return cls(**dict(d))


# ---------------------------------------------------------------------------------------------
# Distances

def l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample mean squared difference (the reference's ``loss_l2``)."""
    return ((x - y) ** 2).flatten(1).mean(dim=1)


class FeatureDistance:
    """A feature distance in LPIPS's form without its learned weights: ``network(x)`` returns one feature map
    (B, C, H, W) or a list of them; each is normalised to unit length along channels, and the distance is the
    per-sample mean over positions of the squared difference summed over channels, summed over the maps.

    ``network`` is yours (a local file, nothing is downloaded) and is frozen here (no gradient to its weights; the
    gradient flows to the samples). ``prepare`` maps samples to the network's input (e.g. upsampling and clipping to
    [-1, 1], as the reference does for LPIPS at 224 px). An ``lpips.LPIPS`` module can be used directly as
    ``distance=lambda a, b: lp(a, b).flatten()`` instead.
    """

    def __init__(self, network: torch.nn.Module, *, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 name: str = "feature"):
        if not callable(network):
            raise ValueError("FeatureDistance needs a callable network (x -> feature map or list of maps)")
        self.network = network.eval().requires_grad_(False) if isinstance(network, torch.nn.Module) else network
        self.prepare = prepare
        self.name = name

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.network(self.prepare(x) if self.prepare is not None else x)
        maps = list(out) if isinstance(out, (list, tuple)) else [out]
        for f in maps:
            if f.ndim != 4:
                raise ValueError(f"FeatureDistance: the network must return (B, C, H, W) maps, got shape {tuple(f.shape)}")
        return maps

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for fx, fy in zip(self.features(x), self.features(y)):
            nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((nx - ny) ** 2).sum(dim=1).mean(dim=(1, 2))
        return total


# ---------------------------------------------------------------------------------------------
# Optimiser pieces the reference takes from libraries (torch.nn.utils, torch_ema)

def clip_grad_norm(parameters: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s arithmetic (L2 over all gradients; every gradient multiplied by
    min(1, max_norm / (norm + 1e-6))). Returns the norm before clipping. max_norm 0: no clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.detach().mul_(coef.to(g.dtype))
    return float(total)


class EMA:
    """Exponential moving average of parameters, ``torch_ema.ExponentialMovingAverage``'s update (the reference's):
    shadow -= (1 - d)(shadow - param) with d = min(decay, (1 + n) / (10 + n)) after n updates when ``warmup``."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float, warmup: bool = True):
        self.params = list(parameters)
        self.decay = float(decay)
        self.updates = 0 if warmup else None
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        if self.updates is not None:
            self.updates += 1
            d = min(d, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.sub_((s - p).mul_(1.0 - d))

    def state(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.shadow]

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parameters and the averages (twice restores)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


# ---------------------------------------------------------------------------------------------
# Training

@dataclass
class GSTrainProgress:
    """One optimiser step: iteration, training loss, gradient norm (before clipping), the validation loss when it was
    measured at this iteration (EMA parameters), the best so far, trajectories seen, seconds."""

    iteration: int
    loss: float
    grad_norm: float
    val_loss: Optional[float]
    best_val: Optional[float]
    trajectories: int
    seconds: float


@dataclass
class GSTrainResult:
    params: GSParams
    config: GSTrainConfig
    losses: list = field(default_factory=list)          # training loss per iteration
    val_history: list = field(default_factory=list)     # [(iteration, validation loss of the EMA parameters)]
    best_iteration: Optional[int] = None
    best_val: Optional[float] = None
    updates: int = 0
    skipped: int = 0
    trajectories: int = 0
    seconds: float = 0.0
    initial_val: Optional[float] = None                  # the initial parameters' validation loss


def validation_loss(denoiser, params: GSParams, noise: torch.Tensor, target: torch.Tensor, *, class_labels=None,
                    distance: Callable | None = None, batch_size: int = 128) -> float:
    """Mean per-sample distance of GS's samples from ``noise`` to ``target`` (no gradient)."""
    dist = distance or l2_distance
    total, n = 0.0, 0
    with torch.no_grad():
        for lo in range(0, noise.shape[0], batch_size):
            sl = slice(lo, lo + batch_size)
            labels = None if class_labels is None else class_labels[sl]
            x = gs_sample(denoiser, params.start_state(noise[sl]), params, class_labels=labels).x
            d = dist(x, target[sl].to(x.dtype))
            total += float(d.sum())
            n += int(d.shape[0])
    return total / max(n, 1)


def _check_pairs(noise, target, labels, what: str):
    if not (torch.is_tensor(noise) and torch.is_tensor(target)) or noise.shape != target.shape or noise.ndim < 2:
        raise ValueError(f"{what}: noise and target must be tensors of one (n, C, H, W) shape, got "
                         f"{tuple(getattr(noise, 'shape', ()))} and {tuple(getattr(target, 'shape', ()))}")
    if labels is not None and labels.shape[0] != noise.shape[0]:
        raise ValueError(f"{what}: {labels.shape[0]} class labels for {noise.shape[0]} samples")


def train_gs(denoiser, params: GSParams, noise: torch.Tensor, target: torch.Tensor, cfg: GSTrainConfig | None = None, *,
             class_labels: torch.Tensor | None = None, val: tuple | None = None, distance: Callable | None = None,
             callback: Callable[[GSTrainProgress], None] | None = None) -> GSTrainResult:
    """Fit ``params`` so that GS from each ``noise`` lands on the teacher's ``target`` (its final sample for that noise).

    noise, target: (n, C, H, W) training pairs (the teacher's standard normal draws and end states); val: (noise,
    target[, class_labels]) held-out pairs for keeping the best checkpoint (None: keep the last EMA). distance: (x, y)
    -> (B,) per-sample distances (default :func:`l2_distance`). Returns the EMA parameters that scored best on the
    validation pairs (``cfg.keep``), loaded into ``params``.
    """
    cfg = cfg or GSTrainConfig()
    if not isinstance(params, GSParams):
        raise ValueError(f"params must be a GSParams, got {type(params).__name__}")
    _check_pairs(noise, target, class_labels, "training pairs")
    dtype = _DTYPES[cfg.dtype] if cfg.dtype else noise.dtype
    noise, target = noise.to(dtype), target.to(dtype)
    labels = class_labels.to(dtype) if class_labels is not None else None
    if val is not None:
        vn, vt = val[0].to(dtype), val[1].to(dtype)
        vl = val[2].to(dtype) if len(val) > 2 and val[2] is not None else None
        _check_pairs(vn, vt, vl, "validation pairs")
    n = noise.shape[0]
    if cfg.batch_size > n:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training pairs (batches drop the remainder, "
                         "as the reference's DataLoader does); lower batch_size or store more teacher trajectories")
    dist = distance or l2_distance
    params.to(noise.device).train().requires_grad_(True)
    plist = list(params.parameters())
    opt = Adam(plist, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    ema = EMA(plist, cfg.ema_decay, cfg.ema_warmup)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = GSTrainResult(params=params, config=cfg)
    best_state = None
    t0 = time.perf_counter()

    def validate() -> float:
        return validation_loss(denoiser, params, vn, vt, class_labels=vl, distance=dist, batch_size=cfg.val_batch_size)

    if val is not None:
        result.initial_val = validate()
    it = 0
    while it < cfg.iterations:
        perm = torch.randperm(n, generator=gen)
        for b in range(n // cfg.batch_size):
            if it == cfg.iterations:
                break
            it += 1
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            x = gs_sample(denoiser, params.start_state(noise[idx]), params,
                          class_labels=None if labels is None else labels[idx]).x
            loss = dist(x, target[idx]).mean()
            value = float(loss.detach())
            grad_norm = float("nan")
            if math.isfinite(value):
                loss.backward()
                grad_norm = clip_grad_norm(plist, cfg.grad_clip)
            result.trajectories += int(idx.shape[0])
            if not math.isfinite(grad_norm):
                result.skipped += 1
            else:
                opt.step()
                ema.update()
                result.updates += 1
            result.losses.append(value)
            val_now = None
            if val is not None and (it == 1 or it % cfg.eval_every == 0 or it == cfg.iterations):
                ema.swap()
                val_now = validate()
                if result.best_val is None or val_now < result.best_val:
                    result.best_val, result.best_iteration = val_now, it
                    best_state = [p.detach().clone() for p in plist]
                ema.swap()
                result.val_history.append((it, val_now))
            if callback is not None:
                callback(GSTrainProgress(it, value, grad_norm, val_now, result.best_val, result.trajectories,
                                         time.perf_counter() - t0))
    with torch.no_grad():
        final = best_state if (cfg.keep == "best" and best_state is not None) else ema.state()
        for p, v in zip(plist, final):
            p.copy_(v)
    params.eval().requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Tensor file

GS_TENSOR_FILE = "gs.safetensors"


def gs_tensor_bytes(params: GSParams) -> bytes:
    """The four learned tensors as safetensors bytes (equal tensors give equal bytes: one metadata key, since the
    order of several is not kept)."""
    from safetensors.torch import save as st_save

    tensors = {name: getattr(params, name).detach().to("cpu").contiguous() for name in GSParams.TENSORS}
    return st_save(tensors, metadata={"amed": '{"format": "gs-params", "version": 1}'})


def gs_tensors_from_bytes(data: bytes, config: GSConfig, *, file: str = GS_TENSOR_FILE) -> GSParams:
    """GSParams from :func:`gs_tensor_bytes`'s bytes and the config they belong to. Every tensor is checked: present,
    floating point, the config's shape, finite; errors name the file and the tensor. Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file}: not a safetensors file ({e})") from None
    extra = sorted(set(tensors) - set(GSParams.TENSORS))
    if extra:
        raise ValueError(f"{file}: unexpected tensor(s) {extra}; a GS checkpoint holds {list(GSParams.TENSORS)}")
    N, order = config.steps, config.order
    shapes = {"mu_logit": (N - 1,), "t_couple": (N,), "c_diff": (order, N), "a_diff": (order, N)}
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"{file}: tensor {name} is missing")
        t = tensors[name]
        if not t.dtype.is_floating_point:
            raise ValueError(f"{file}: tensor {name} has dtype {t.dtype}, expected a floating point type")
        if tuple(t.shape) != shape:
            raise ValueError(f"{file}: tensor {name} has shape {tuple(t.shape)}; steps={N}, order={order} need {shape}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{file}: tensor {name} holds non-finite values")
    if len({tensors[n].dtype for n in shapes}) != 1:
        raise ValueError(f"{file}: the tensors must share one dtype, got {sorted({str(t.dtype) for t in tensors.values()})}")
    return GSParams.from_tensors(config, tensors).eval().requires_grad_(False)
