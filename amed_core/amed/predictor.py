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

Ours (off by default): ``PredictorConfig.step_bias = N - 1`` adds a learned logit per step to r's head. With the
heads' weights zero and those logits at logit(r_i), the predictor *is* a FixedPolicy of given r_i (scales 1), so a
sampler can start training exactly at a training-free winner's grid (:func:`init_from_steps`,
:mod:`amed_core.families.init`) and move away from it only as far as training (and validation) says.
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

__all__ = ["PredictorConfig", "AMEDPredictor", "FixedPolicy", "Policy", "FEATURE_SIZE", "init_from_steps"]



class Policy(Protocol):
    def __call__(self, features: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, step_idx: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class PredictorConfig:
    """Sizes of the AMED predictor. The defaults are the reference's: 8,929 parameters for r, +21 per scale head.

    scale_dir / scale_time: half-widths s_d / s_t of the scale heads' ranges (0 disables the head and fixes
    the scale at 1).
    step_bias: steps with a learned logit of their own added to r's head (ours; 0 = the reference's architecture).
    """

    feature_dim: int = FEATURE_SIZE * FEATURE_SIZE
    hidden_dim: int = 128
    bottleneck_dim: int = 4
    time_channels: int = 8
    max_positions: int = 10_000
    scale_dir: float = 0.01
    scale_time: float = 0.0
    step_bias: int = 0

    def __post_init__(self):
        if not isinstance(self.step_bias, int) or isinstance(self.step_bias, bool) or self.step_bias < 0:
            raise ValueError(f"PredictorConfig.step_bias must be an integer >= 0 (steps with a logit of their own), "
                             f"got {self.step_bias!r}")
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
        d = asdict(self)
        if not d["step_bias"]:  # added after the format was fixed: left out while 0 (old ids and bytes stay)
            del d["step_bias"]
        return d

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
        # float64, so a start at given r_i is exact to float64 rounding (float32 logits move r by ~1e-8)
        self.r_step = torch.nn.Parameter((torch.zeros if g is not None else torch.empty)(cfg.step_bias, dtype=torch.float64)) \
            if cfg.step_bias else None

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
        logit = self.fc_r(out)[:, 0]
        if self.r_step is not None:
            if step_idx is None or not 0 <= int(step_idx) < self.r_step.shape[0]:
                raise ValueError(f"this predictor has per-step logits for {self.r_step.shape[0]} steps; step_idx "
                                 f"{step_idx!r} is outside them (num_steps - 1 must match)")
            logit = logit + self.r_step[int(step_idx)].to(logit.dtype)
        r = torch.sigmoid(logit)
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


def init_from_steps(predictor: AMEDPredictor, r: Sequence[float]) -> AMEDPredictor:
    """Make ``predictor`` the fixed policy of per-step ``r`` (scales 1): every head's weights and bias zero, r's
    per-step logits at logit(r_i). Needs ``config.step_bias == len(r)``; r_i in (0, 1) (1 - 1e-9 stands in for 1,
    r = 1 putting the intermediate point at t_next). Returns the predictor (changed in place)."""
    r = [float(v) for v in r]
    if predictor.r_step is None or predictor.r_step.shape[0] != len(r):
        raise ValueError(f"init_from_steps: the predictor needs PredictorConfig.step_bias={len(r)} (one logit per "
                         f"step), it has {0 if predictor.r_step is None else predictor.r_step.shape[0]}")
    if any(not 0 < v <= 1 for v in r):
        raise ValueError(f"init_from_steps: r must lie in (0, 1], got {r}")
    with torch.no_grad():
        for head in (predictor.fc_r, predictor.fc_scale_dir, predictor.fc_scale_time):
            if head is not None:
                head.weight.zero_()
                head.bias.zero_()
        predictor.r_step.copy_(torch.tensor([math.log(v / (1 - v)) if v < 1 - 1e-9 else math.log((1 - 1e-9) / 1e-9)
                                             for v in r], dtype=predictor.r_step.dtype))
    return predictor
