"""A tiny EDM-preconditioned UNet, trained on scikit-learn's digits in minutes on a CPU.

The real neural teacher for tests and the CPU demo (AMED, Zhou et al. 2024, arXiv 2312.00094, needs a
network with a bottleneck to read features from; a Gaussian mixture has none). The raw network
``F(c_in x; c_noise, labels)`` is wrapped by :class:`amed_core.adapters.edm.PreconditionedDenoiser`
(EDM, Karras et al. 2022, Table 1):

    D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s)),
    c_skip = sd^2 / (s^2 + sd^2),  c_out = s sd / sqrt(s^2 + sd^2),  c_in = 1 / sqrt(s^2 + sd^2),  c_noise = ln(s) / 4,

and trained with EDM's loss  E_{s, x0, n} lambda(s) ||D(x0 + s n; s) - x0||^2,  ln s ~ N(P_mean, P_std^2),
lambda(s) = (s^2 + sd^2) / (s sd)^2.

Layout (EDM's module names): ``enc`` holds ``{R}x{R}_conv``, ``{R}x{R}_block{i}`` and ``{r}x{r}_down``; one
level is 8x8, and AMED reads the last ``8x8_block`` of the encoder (as the reference does for EDM's networks).
The default works at the digits' native 8x8 (levels 8x8 and 4x4, ~0.1M parameters); ``img_resolution=16``
upsamples the digits bilinearly. Training on digits: :mod:`amed_core.tiny_train` (the network does not import
the adapter that wraps and trains it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyUNetConfig", "TinyUNet", "NOISE_EMBEDDINGS"]

# How c_noise = ln(sigma) / 4 enters the network. "fourier": frequencies pi * 2^[0, 6] (the digits teacher's; the
# denoiser then oscillates in sigma: its second derivative in ln sigma is 5-300x the exact digits mixture's, so its ODE
# needs many more points to converge, BENCHMARKS "Neural teachers"); "positional": EDM's PositionalEmbedding
# (frequencies (1/10000)^(i / (n/2 - 1)), endpoint=True, cos then sin), smooth in sigma like EDM's networks.
NOISE_EMBEDDINGS = ("fourier", "positional")


@dataclass(frozen=True)
class TinyUNetConfig:
    """Architecture of :class:`TinyUNet` (JSON round-trip through ``to_dict`` / ``from_dict``)."""

    img_resolution: int = 8
    in_channels: int = 1
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    label_dim: int = 0
    emb_dim: int = 64
    dropout: float = 0.0
    noise_embedding: str = "fourier"

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(c) for c in self.channel_mult))
        if self.noise_embedding not in NOISE_EMBEDDINGS:
            raise ValueError(f"noise_embedding must be one of {NOISE_EMBEDDINGS}, got {self.noise_embedding!r}")
        if self.img_resolution < 8 or self.img_resolution & (self.img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 8, got {self.img_resolution}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.img_resolution >> (len(self.channel_mult) - 1) > 8 or self.img_resolution >> (len(self.channel_mult) - 1) < 2:
            want = int(math.log2(self.img_resolution // 8)) + 1
            raise ValueError(f"channel_mult needs {want} to {want + 2} levels so that an 8x8 level exists and the lowest "
                             f"is at least 2x2 (img_resolution {self.img_resolution}), got {len(self.channel_mult)}")
        for name in ("in_channels", "model_channels", "num_blocks", "emb_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {self.label_dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyUNetConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TinyUNetConfig field(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def _groups(ch: int) -> int:
    return math.gcd(ch, 8) or 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the noise embedding added in between; residual scaled by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, down: bool = False) -> None:
        super().__init__()
        self.down = down
        self.norm0 = nn.GroupNorm(_groups(cin), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, cout)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.affine(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        return (h + self.skip(x)) / math.sqrt(2)


class TinyUNet(nn.Module):
    """Raw network F(x_in, c_noise, class_labels) of a small UNet with an 8x8 level (AMED reads its last encoder block)."""

    def __init__(self, config: TinyUNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = TinyUNetConfig(**kwargs)
        elif kwargs:
            raise ValueError("pass either a TinyUNetConfig or keyword fields, not both")
        self.config = c = config
        # sinusoidal embedding of c_noise = ln(sigma)/4 (range ~[-2, 1.2]): at frequencies pi * 2^[0, 6] ("fourier"),
        # or EDM's positional frequencies (1/10000)^(i/(n-1)) ("positional"; NOISE_EMBEDDINGS)
        half = c.emb_dim // 4
        if c.noise_embedding == "fourier":
            freqs = math.pi * 2.0 ** torch.linspace(0, 6, half)
        else:
            freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32) / max(1, half - 1))
        self.register_buffer("freqs", freqs)
        self.map_noise = nn.Sequential(nn.Linear(2 * (c.emb_dim // 4), c.emb_dim), nn.SiLU(), nn.Linear(c.emb_dim, c.emb_dim))
        self.map_label = nn.Linear(c.label_dim, c.emb_dim, bias=False) if c.label_dim else None
        self.enc = nn.ModuleDict()
        skips: list[int] = []
        cout = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            res = c.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(c.in_channels, cout, 3, padding=1)
            else:
                cin, cout = cout, c.model_channels * mult
                self.enc[f"{res}x{res}_down"] = ResBlock(cin, cout, c.emb_dim, c.dropout, down=True)
            skips.append(cout)
            for i in range(c.num_blocks):
                cin, cout = cout, c.model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = ResBlock(cin, cout, c.emb_dim, c.dropout)
                skips.append(cout)
        self.dec = nn.ModuleDict()
        for level in reversed(range(len(c.channel_mult))):
            res = c.img_resolution >> level
            mult = c.channel_mult[level]
            if level != len(c.channel_mult) - 1:
                self.dec[f"{res}x{res}_up"] = nn.Upsample(scale_factor=2, mode="nearest")
            for i in range(c.num_blocks + 1):
                cin, cout = cout + skips.pop(), c.model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = ResBlock(cin, cout, c.emb_dim, c.dropout)
        self.out_norm = nn.GroupNorm(_groups(cout), cout)
        self.out_conv = nn.Conv2d(cout, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        ang = noise_labels.reshape(-1, 1).to(x.dtype) * self.freqs.to(x.dtype)
        emb = self.map_noise(torch.cat([ang.cos(), ang.sin()], dim=1))
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels.to(x.dtype))
        emb = F.silu(emb)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if name.endswith("_up"):
                x = block(x)
            else:
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(x)))
