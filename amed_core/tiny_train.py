"""Training the tiny digits UNet (:mod:`amed_core.tiny_unet`) with EDM's loss, wrapped in the EDM adapter.

EDM (Karras et al. 2022): loss  E_{s, x0, n} lambda(s) ||D(x0 + s n; s) - x0||^2,  ln s ~ N(P_mean, P_std^2),
lambda(s) = (s^2 + sd^2) / (s sd)^2; Adam; an EMA of the weights is the result. The denoiser is a
:class:`~amed_core.adapters.edm.PreconditionedDenoiser` saved in the ``tiny-unet:DIR`` format.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .adapters.edm_network import NetworkConfig, Preconditioning, PreconditionedDenoiser, save_network
from .tiny_unet import TinyUNet, TinyUNetConfig

__all__ = ["TinyUNetConfig", "TrainTinyConfig", "digits_dataset", "train_tiny"]

log = logging.getLogger(__name__)


# -- training on scikit-learn's digits --------------------------------------------------------------------------


def digits_dataset(img_resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits in [-1, 1], bilinearly upsampled to ``img_resolution``; returns (images, labels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ValueError("train_tiny needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0 * 2 - 1)[:, None]
    if img_resolution != 8:
        x = F.interpolate(x, size=(img_resolution, img_resolution), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(np.asarray(d.target, dtype=np.int64))


@dataclass(frozen=True)
class TrainTinyConfig:
    """Options of :func:`train_tiny` (EDM's loss and lognormal sigma sampling; Adam; EMA of the weights)."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    ema_halflife_steps: float = 100.0
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    conditional: bool = False
    seed: int = 0
    unet: TinyUNetConfig = field(default_factory=TinyUNetConfig)

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", TinyUNetConfig.from_dict(self.unet))
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "sigma_data", "P_std", "ema_halflife_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be positive and below sigma_max ({self.sigma_max})")
        if self.conditional and self.unet.label_dim != 10:
            object.__setattr__(self, "unet", TinyUNetConfig.from_dict({**self.unet.to_dict(), "label_dim": 10}))
        if not self.conditional and self.unet.label_dim:
            raise ValueError("unet.label_dim must be 0 unless conditional=True (digits have 10 classes)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        return d


def train_tiny(
    *,
    config: TrainTinyConfig | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    **overrides,
):
    """Train a tiny EDM-preconditioned UNet on digits; returns the (EMA) denoiser, saved to ``out`` if given.

    ``overrides`` are TrainTinyConfig fields (e.g. ``steps=200``). Deterministic for a given seed on one machine.
    The result is a :class:`~amed_core.adapters.edm.PreconditionedDenoiser` (``load_teacher("tiny-unet:DIR")``).
    """
    if config is None:
        config = TrainTinyConfig(**overrides)
    elif overrides:
        config = TrainTinyConfig(**{**config.to_dict(), **overrides})
    c = config
    gen = torch.Generator().manual_seed(c.seed)
    torch.manual_seed(c.seed)
    images, labels = digits_dataset(c.unet.img_resolution)
    if c.unet.in_channels != 1:
        raise ValueError(f"digits are single-channel: unet.in_channels must be 1, got {c.unet.in_channels}")
    net_cfg = NetworkConfig(
        arch="tiny-unet", kwargs=c.unet.to_dict(), shape=(1, c.unet.img_resolution, c.unet.img_resolution),
        label_dim=c.unet.label_dim, precond=Preconditioning(kind="edm", sigma_data=c.sigma_data),
        sigma_min=c.sigma_min, sigma_max=c.sigma_max,
        name=f"tiny-unet-digits{'-cond' if c.conditional else ''}-{c.unet.img_resolution}px-s{c.seed}",
        extra={"train": c.to_dict()},
    )
    model = PreconditionedDenoiser(TinyUNet(c.unet), net_cfg)
    ema = PreconditionedDenoiser(TinyUNet(c.unet), net_cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=c.lr)
    beta = 0.5 ** (1.0 / c.ema_halflife_steps)
    steps = range(c.steps)
    bar = None
    if progress:
        from .progress import progress as progress_bar

        bar = progress_bar(total=c.steps, desc="train-tiny", unit="step")  # a bar on a terminal, lines elsewhere
    model.train()
    running = None
    for step in steps:
        idx = torch.randint(0, images.shape[0], (c.batch_size,), generator=gen)
        y = images[idx]
        lab = F.one_hot(labels[idx], 10).float() if c.conditional else None
        # EDM's loss: ln sigma ~ N(P_mean, P_std^2), weight (s^2 + sd^2) / (s sd)^2
        sigma = torch.exp(c.P_mean + c.P_std * torch.randn(c.batch_size, generator=gen))
        n = torch.randn(y.shape, generator=gen) * sigma[:, None, None, None]
        weight = (sigma**2 + c.sigma_data**2) / (sigma * c.sigma_data) ** 2
        D = model(y + n, sigma, lab)
        loss = (weight[:, None, None, None] * (D - y) ** 2).mean()
        # cosine learning-rate decay over the last half keeps the short run stable
        frac = step / max(1, c.steps - 1)
        for g in opt.param_groups:
            g["lr"] = c.lr * (1.0 if frac < 0.5 else 0.5 * (1 + math.cos(math.pi * (frac - 0.5) / 0.5)) * 0.9 + 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - beta)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if callback is not None:
            callback(step, loss.item())
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{running:.4g}")
        elif step % 500 == 0 or step == c.steps - 1:
            log.info("train-tiny step %d/%d loss %.4f", step + 1, c.steps, running)
    if bar is not None:
        bar.close()
    ema.eval()
    if out is not None:
        save_network(ema, out)
    return ema
