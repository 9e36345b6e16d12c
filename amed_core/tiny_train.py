"""Training the tiny UNets (:mod:`amed_core.tiny_unet`) with EDM's loss, wrapped in the EDM adapter.

EDM (Karras et al. 2022): loss  E_{s, x0, n} lambda(s) ||D(x0 + s n; s) - x0||^2,  ln s ~ N(P_mean, P_std^2),
lambda(s) = (s^2 + sd^2) / (s sd)^2; Adam; an EMA of the weights is the result. The denoiser is a
:class:`~amed_core.adapters.edm.PreconditionedDenoiser` saved in the ``tiny-unet:DIR`` format.

Two data sets, both shipped inside PyPI wheels (nothing is downloaded):

- ``digits``: scikit-learn's 1797 8x8 handwritten digits (``digits-tiny-unet``);
- ``photos``: 32x32 RGB crops of the ten photographs in :data:`PHOTOS` (eight inside scikit-image's wheel, two inside
  scikit-learn's), each downscaled to several sizes (:data:`PHOTO_SHORT_SIDES`) and cropped at random positions with
  random horizontal flips (``photos-tiny-unet``). ``skimage.data``'s other images are either not photographs or
  fetched by pooch at run time; only files present in the wheels are read, by path, with Pillow.
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

__all__ = ["TinyUNetConfig", "TrainTinyConfig", "DATASETS", "PHOTOS", "PHOTO_SHORT_SIDES", "PhotoCrops", "digits_dataset",
           "photo_bank", "train_tiny", "photos_unet_config"]

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


# -- natural-image crops from photographs shipped inside wheels ---------------------------------------------------

# (package, path inside the installed package): RGB photographs. scikit-image 0.26's wheel holds these files under
# skimage/data (checked by listing the wheel; its other images are synthetic, grey or fetched by pooch), scikit-learn's
# under sklearn/datasets/images.
PHOTOS = (
    ("skimage", "data/astronaut.png"), ("skimage", "data/chelsea.png"), ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"), ("skimage", "data/motorcycle_left.png"), ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"), ("skimage", "data/retina.jpg"),
    ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
)
PHOTO_SHORT_SIDES = (48, 64, 96, 128)  # each photo downscaled so that its shorter side is this many pixels
DATASETS = ("digits", "photos")


def _package_file(package: str, rel: str) -> Path:
    """A data file inside an installed package, found without importing the package (scikit-image's import is slow)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(package, package)
        raise ValueError(f"the photo crops need {pip}'s bundled photographs: pip install {pip} "
                         "(or pip install 'amed-distill[images]'); nothing is downloaded")
    path = Path(list(spec.submodule_search_locations)[0], rel)
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed {package}: reinstall it from its wheel (the photo "
                         "crops read only files that ship inside the wheels)")
    return path


def photo_bank(short_sides: tuple[int, ...] = PHOTO_SHORT_SIDES, min_size: int = 32) -> list[torch.Tensor]:
    """Every photo of :data:`PHOTOS` at every size of ``short_sides`` (box-filter downscaling, Pillow): a list of
    (3, H, W) float32 tensors in [-1, 1]."""
    from PIL import Image

    bank = []
    for package, rel in PHOTOS:
        with Image.open(_package_file(package, rel)) as im:
            im = im.convert("RGB")
            w, h = im.size
            for side in short_sides:
                scale = side / min(w, h)
                size = (max(min_size, round(w * scale)), max(min_size, round(h * scale)))
                small = im.resize(size, Image.Resampling.BOX)
                arr = np.asarray(small, dtype=np.float32) / 127.5 - 1.0
                bank.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
    return bank


class PhotoCrops:
    """Random ``resolution`` x ``resolution`` crops of :func:`photo_bank` (photo and size uniform, position uniform,
    horizontal flip with probability 1/2); ``draw(n, generator)`` -> (n, 3, R, R) in [-1, 1]."""

    def __init__(self, resolution: int = 32, short_sides: tuple[int, ...] = PHOTO_SHORT_SIDES):
        self.resolution = int(resolution)
        self.bank = photo_bank(short_sides, min_size=self.resolution)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        R = self.resolution
        which = torch.randint(len(self.bank), (n,), generator=generator)
        u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
        out = torch.empty(n, 3, R, R)
        for k in range(n):
            img = self.bank[int(which[k])]
            y = int(u[k, 0] * (img.shape[1] - R + 1))
            x = int(u[k, 1] * (img.shape[2] - R + 1))
            crop = img[:, y:y + R, x:x + R]
            out[k] = crop.flip(-1) if u[k, 2] < 0.5 else crop
        return out


def photos_unet_config(channels: int = 16) -> TinyUNetConfig:
    """The photos teacher's architecture: 32x32 RGB, levels 32 / 16 / 8 (AMED reads the 8x8 block), EDM's positional
    noise embedding (smooth in sigma)."""
    return TinyUNetConfig(img_resolution=32, in_channels=3, model_channels=channels, channel_mult=(1, 2, 2),
                          noise_embedding="positional")


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
    dataset: str = "digits"

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", TinyUNetConfig.from_dict(self.unet))
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "photos":
            if self.conditional:
                raise ValueError("conditional=True needs dataset 'digits' (the photo crops have no classes)")
            if self.unet.in_channels != 3:
                raise ValueError(f"photo crops are RGB: unet.in_channels must be 3, got {self.unet.in_channels} "
                                 "(see photos_unet_config)")
        elif self.unet.in_channels != 1:
            raise ValueError(f"digits are single-channel: unet.in_channels must be 1, got {self.unet.in_channels}")
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
    """Train a tiny EDM-preconditioned UNet on digits or photo crops (``dataset``); returns the (EMA) denoiser, saved
    to ``out`` if given (its config declares the data range [-1, 1]).

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
    if c.dataset == "photos":
        crops = PhotoCrops(c.unet.img_resolution)
    else:
        images, labels = digits_dataset(c.unet.img_resolution)
    R = c.unet.img_resolution
    net_cfg = NetworkConfig(
        arch="tiny-unet", kwargs=c.unet.to_dict(), shape=(c.unet.in_channels, R, R),
        label_dim=c.unet.label_dim, precond=Preconditioning(kind="edm", sigma_data=c.sigma_data),
        sigma_min=c.sigma_min, sigma_max=c.sigma_max, data_range=(-1.0, 1.0),
        name=f"tiny-unet-{c.dataset}{'-cond' if c.conditional else ''}-{R}px-s{c.seed}",
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

        bar = progress_bar(total=c.steps, desc=f"train {c.dataset}", unit="step")  # a bar on a terminal, lines elsewhere
    model.train()
    running = None
    for step in steps:
        if c.dataset == "photos":
            y, lab = crops.draw(c.batch_size, gen), None
        else:
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
            log.info("train %s step %d/%d loss %.4f", c.dataset, step + 1, c.steps, running)
    if bar is not None:
        bar.close()
    ema.eval()
    if out is not None:
        save_network(ema, out)
    return ema
