"""The AMED predictor and the policy protocol (Zhou et al., "Fast ODE-based Sampling for Diffusion
Models in Around 5 Steps", arXiv 2312.00094, sec. 3.3).

A *policy* maps what the solver knows at the start of a step to the step's free parameters:

    policy(features (B, 8, 8), t_cur, t_next, step_idx) -> (r, scale_dir, scale_time), each (B,)

- r in (0, 1) places the intermediate time  s = t_next^r * t_cur^(1 - r)  (geometric interpolation);
- scale_dir c in (1 - s_d, 1 + s_d) multiplies the step towards t_next;
- scale_time a in (1 - s_t, 1 + s_t) moves the evaluation time to a * s.

:class:`AMEDPredictor` is the learned policy of the paper's code: a positional embedding of t_cur and
of t_next (8 channels each) through one shared linear layer + SiLU, a per-sample encoder of the
flattened 8x8 feature map (64 -> 128 -> 4, SiLU between), and linear heads on the concatenation
(4 + 8 + 8 = 20 inputs) with sigmoids. :class:`FixedPolicy` returns the same per-step values for every
sample (the golden cases, ablations, and a learned predictor's per-step summary).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from .._fields import check_fields
from ..base_denoiser import FEATURE_SIZE  # features are (B, 8, 8)

__all__ = ["PredictorConfig", "AMEDPredictor", "FixedPolicy", "Policy", "FEATURE_SIZE"]



class Policy(Protocol):
    def __call__(self, features: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, step_idx: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class PredictorConfig:
    """Sizes of the AMED predictor. The defaults are the reference's: 8,929 parameters for r, +21 per scale head.

    scale_dir / scale_time: half-widths s_d / s_t of the scale heads' ranges (0 disables the head and fixes
    the scale at 1).
    """

    feature_dim: int = FEATURE_SIZE * FEATURE_SIZE
    hidden_dim: int = 128
    bottleneck_dim: int = 4
    time_channels: int = 8
    max_positions: int = 10_000
    scale_dir: float = 0.01
    scale_time: float = 0.0

    def __post_init__(self):
        for name in ("feature_dim", "hidden_dim", "bottleneck_dim", "time_channels", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PredictorConfig.{name} must be a positive integer, got {v!r}")
        if self.time_channels % 2 or self.time_channels < 4:
            raise ValueError(f"PredictorConfig.time_channels must be even and >= 4, got {self.time_channels}")
        if self.feature_dim != FEATURE_SIZE * FEATURE_SIZE:
            raise ValueError(f"PredictorConfig.feature_dim must be {FEATURE_SIZE * FEATURE_SIZE} (features are 8x8 maps)")
        for name in ("scale_dir", "scale_time"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < 1):
                raise ValueError(f"PredictorConfig.{name} must be a number in [0, 1) (0 disables that head), got {v!r}")
            object.__setattr__(self, name, float(v))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorConfig":
        check_fields(cls, d)
        return cls(**d)


class _Linear(torch.nn.Module):
    """y = x W^T + b with the weights cast to the input's dtype (the reference's Linear)."""

    def __init__(self, fan_in: int, fan_out: int, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(torch.zeros(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype).t() + self.bias.to(x.dtype)


def _kaiming_normal(fan_in, fan_out, g):
    if g is None:  # shapes only (seed=None)
        return torch.empty(fan_out, fan_in)
    return math.sqrt(1 / fan_in) * torch.randn(fan_out, fan_in, generator=g)


def _xavier_uniform(fan_in, fan_out, g):
    if g is None:
        return torch.empty(fan_out, fan_in)
    return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(fan_out, fan_in, generator=g) * 2 - 1)


class AMEDPredictor(torch.nn.Module):
    """The learned AMED policy (a ~9k-parameter MLP); see the module docstring for the architecture.

    ``forward(features, t_cur, t_next, step_idx=None) -> (r, scale_dir, scale_time)`` each ``(B,)`` in the
    features' dtype. ``t_cur``/``t_next`` are scalars (one step of one grid). Initialisation (given a
    seed): time layer Xavier-uniform, other weights N(0, 1/fan_in), biases 0, as in the reference.
    ``seed=None`` leaves the weights uninitialised (``torch.empty``): for shapes under ``torch.device("meta")`` or
    before a strict ``load_state_dict``. (Random initialisation on the meta device goes through torch's Python
    decompositions, which import ``torch._dynamo``: 0.9 s the first time a process checked a checkpoint.)
    """

    needs_features = True

    def __init__(self, config: PredictorConfig | None = None, *, seed: int | None = 0):
        super().__init__()
        self.config = cfg = config or PredictorConfig()
        g = None if seed is None else torch.Generator().manual_seed(int(seed))
        tc, hd, bd = cfg.time_channels, cfg.hidden_dim, cfg.bottleneck_dim
        self.map_layer0 = _Linear(tc, tc, _xavier_uniform(tc, tc, g))
        self.enc_layer0 = _Linear(cfg.feature_dim, hd, _kaiming_normal(cfg.feature_dim, hd, g))
        self.enc_layer1 = _Linear(hd, bd, _kaiming_normal(hd, bd, g))
        n_in = 2 * tc + bd
        self.fc_r = _Linear(n_in, 1, _kaiming_normal(n_in, 1, g))
        self.fc_scale_dir = _Linear(n_in, 1, _kaiming_normal(n_in, 1, g)) if cfg.scale_dir > 0 else None
        self.fc_scale_time = _Linear(n_in, 1, _kaiming_normal(n_in, 1, g)) if cfg.scale_time > 0 else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[sin(t w_j), cos(t w_j)], w_j = max_positions^(-j / (C/2 - 1)), j < C/2 (positional, endpoint=True)."""
        half = self.config.time_channels // 2
        freqs = torch.arange(half, dtype=torch.float32) / (half - 1)
        freqs = ((1 / self.config.max_positions) ** freqs).to(dtype)
        # One row for a scalar t: computed on the CPU (bit-identical on every device), moved once to the layers' device.
        arg = torch.as_tensor(t, dtype=dtype).cpu().reshape(1, 1) * freqs.reshape(1, -1)
        return torch.cat([arg.sin(), arg.cos()], dim=1).to(self.map_layer0.weight.device)

    def forward(self, features: torch.Tensor, t_cur, t_next, step_idx: int | None = None):
        if features is None:
            raise ValueError("AMEDPredictor needs per-sample features: use a denoiser with capture_features()")
        if features.ndim != 3 or features.shape[1] * features.shape[2] != self.config.feature_dim:
            raise ValueError(f"features must be (B, 8, 8), got {tuple(features.shape)}")
        B, dtype = features.shape[0], features.dtype
        # Time embeddings of t_cur and t_next through the shared layer.
        emb = torch.cat([F.silu(self.map_layer0(self.time_embedding(t, dtype))) for t in (t_cur, t_next)], dim=1)
        # Per-sample feature encoder.
        h = self.enc_layer1(F.silu(self.enc_layer0(features.reshape(B, -1))))
        out = torch.cat([h, emb.expand(B, -1)], dim=1)
        # Heads: r in (0, 1); scales in (1 - s, 1 + s).
        r = torch.sigmoid(self.fc_r(out))[:, 0]
        ones = torch.ones_like(r)
        cfg = self.config
        sd = 1 - cfg.scale_dir + 2 * cfg.scale_dir * torch.sigmoid(self.fc_scale_dir(out))[:, 0] if self.fc_scale_dir is not None else ones
        st = 1 - cfg.scale_time + 2 * cfg.scale_time * torch.sigmoid(self.fc_scale_time(out))[:, 0] if self.fc_scale_time is not None else ones
        return r, sd, st


class FixedPolicy:
    """Per-step constants: step i returns (r[i], scale_dir[i], scale_time[i]) for every sample."""

    needs_features = False

    def __init__(self, r: Sequence[float], scale_dir: Sequence[float] | None = None, scale_time: Sequence[float] | None = None):
        self.r = np.asarray(r, dtype=np.float64).reshape(-1)
        n = self.r.size
        self.scale_dir = np.ones(n) if scale_dir is None else np.asarray(scale_dir, dtype=np.float64).reshape(-1)
        self.scale_time = np.ones(n) if scale_time is None else np.asarray(scale_time, dtype=np.float64).reshape(-1)
        if self.scale_dir.size != n or self.scale_time.size != n:
            raise ValueError(f"FixedPolicy: r, scale_dir, scale_time need one value per step ({n}); got "
                             f"{self.scale_dir.size} and {self.scale_time.size}")
        if not np.all((self.r > 0) & (self.r <= 1)):
            raise ValueError("FixedPolicy: r must lie in (0, 1]")
        if not np.all(self.scale_time > 0):
            raise ValueError("FixedPolicy: scale_time must be positive")

    def __len__(self) -> int:
        return self.r.size

    def __call__(self, features, t_cur, t_next, step_idx):
        if not 0 <= step_idx < self.r.size:
            raise ValueError(f"FixedPolicy has {self.r.size} steps but step {step_idx} was asked for (num_steps - 1 must match)")
        B = features.shape[0]
        kw = dict(dtype=features.dtype, device=features.device)
        return tuple(torch.full((B,), float(a[step_idx]), **kw) for a in (self.r, self.scale_dir, self.scale_time))
