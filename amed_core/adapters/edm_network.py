"""EDM-form networks in the pickle-free format: ``config.json`` (:class:`NetworkConfig`) + ``model.safetensors``.

Preconditioning (Karras et al. 2022, "Elucidating the design space...", Table 1), converting a raw network
F(x_in; c_noise, labels) into the denoiser the AMED solvers call (Zhou et al. 2024, arXiv 2312.00094):

    D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s), labels)

    kind   c_skip              c_out                    c_in                 c_noise
    edm    sd^2/(s^2+sd^2)     s sd / sqrt(s^2+sd^2)    1/sqrt(s^2+sd^2)     ln(s)/4
    vp     1                   -s                       1/sqrt(s^2+1)        (M-1) t(s),  t(s) = (sqrt(b_min^2 + 2 b_d ln(s^2+1)) - b_min) / b_d
    ve     1                   s                        1                    ln(s/2)

``load_network(DIR)`` builds the raw network from our :class:`~amed_core.tiny_unet.TinyUNet`, diffusers'
``UNet2DModel``, or NVlabs' classes (``SongUNet`` / ``DhariwalUNet`` constructed from the user's EDM checkout,
then filled from safetensors: no unpickling). NVlabs pickles and their one-time conversion to this format:
:mod:`amed_core.adapters.edm` (which re-exports these names).

AMED features: the reference hooks EDM's last 8x8 encoder block (``enc['8x8_block3']`` for the
unconditional SongUNets of CIFAR-10/FFHQ/AFHQv2, ``enc['8x8_block2']`` for the conditional DhariwalUNet of
ImageNet-64); the default here is "the last ``8x8_block`` of ``enc``", which is the same block for those
checkpoints, and ``mid_block`` for diffusers UNets.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..base_denoiser import BaseDenoiser, check_data_range, pool_features
from ..tiny_unet import TinyUNet, TinyUNetConfig
from ..io import atomic_write_bytes, atomic_write_json
from ._common import cached_state_dict_sha256, first_tensor, module_dtype

__all__ = [
    "PRECOND_KINDS",
    "ARCHS",
    "Preconditioning",
    "NetworkConfig",
    "PreconditionedDenoiser",
    "build_network",
    "save_network",
    "load_network",
    "default_feature_layer",
    "FeatureHookMixin",
    "edm_import_error",
    "edm_labels",
    "get_layer",
    "on_edm_code_path",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

PRECOND_KINDS = ("edm", "vp", "ve")
ARCHS = ("tiny-unet", "diffusers-unet2d", "nvlabs")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "amed-edm-network"


@dataclass(frozen=True)
class Preconditioning:
    """Which of EDM's Table-1 preconditionings converts the raw network into D(x; sigma)."""

    kind: str = "edm"
    sigma_data: float = 0.5
    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000

    def __post_init__(self):
        if self.kind not in PRECOND_KINDS:
            raise ValueError(f"precond.kind {self.kind!r} is not one of {PRECOND_KINDS}")
        if not self.sigma_data > 0:
            raise ValueError(f"precond.sigma_data must be positive, got {self.sigma_data}")
        if not (self.beta_d > 0 and self.beta_min >= 0 and int(self.M) >= 2):
            raise ValueError("precond needs beta_d > 0, beta_min >= 0 and M >= 2")

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of any shape, in sigma's dtype."""
        s = sigma
        if self.kind == "edm":
            sd = self.sigma_data
            c_skip = sd**2 / (s**2 + sd**2)
            c_out = s * sd / (s**2 + sd**2).sqrt()
            c_in = 1 / (s**2 + sd**2).sqrt()
            c_noise = s.log() / 4
        elif self.kind == "vp":
            c_skip = torch.ones_like(s)
            c_out = -s
            c_in = 1 / (s**2 + 1).sqrt()
            t = ((self.beta_min**2 + 2 * self.beta_d * (s**2 + 1).log()).sqrt() - self.beta_min) / self.beta_d
            c_noise = (self.M - 1) * t
        else:  # ve
            c_skip = torch.ones_like(s)
            c_out = s
            c_in = torch.ones_like(s)
            c_noise = (0.5 * s).log()
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class NetworkConfig:
    """``config.json`` of a pickle-free EDM-form network (weights beside it in ``model.safetensors``).

    arch: ``tiny-unet`` (kwargs = TinyUNetConfig), ``diffusers-unet2d`` (kwargs = UNet2DModel config) or
    ``nvlabs`` (``nvlabs_class`` from ``nvlabs_module`` of the user's EDM checkout, constructed with kwargs).
    feature_layer: dotted module path inside the raw network (None = the default for the arch).
    data_range: (low, high) of the data the network was trained on (None: not declared; the sweep then measures it,
    ``amed_core.adapters.data_range``); decides whether DPM-Solver++ / UniPC threshold by default.
    """

    arch: str
    kwargs: dict
    shape: tuple[int, int, int]
    precond: Preconditioning = field(default_factory=Preconditioning)
    label_dim: int = 0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    feature_layer: str | None = None
    nvlabs_module: str = "training.networks"
    nvlabs_class: str | None = None
    name: str = "edm-network"
    extra: dict = field(default_factory=dict)
    data_range: tuple[float, float] | None = None

    def __post_init__(self):
        if isinstance(self.precond, dict):
            object.__setattr__(self, "precond", Preconditioning(**self.precond))
        if self.data_range is not None:
            object.__setattr__(self, "data_range", check_data_range(self.data_range, "data_range"))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} is not one of {ARCHS}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be (C, H, W) of positive ints, got {self.shape}")
        if self.label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {self.label_dim}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be positive and below sigma_max ({self.sigma_max})")
        if self.arch == "nvlabs" and not self.nvlabs_class:
            raise ValueError("arch 'nvlabs' needs nvlabs_class (e.g. 'SongUNet' or 'DhariwalUNet')")
        try:
            json.dumps(self.kwargs)
            json.dumps(self.extra)
        except TypeError as e:
            raise ValueError(f"kwargs and extra must be JSON-serialisable: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if self.data_range is not None:
            d["data_range"] = list(self.data_range)
        return {"format": FORMAT, "version": 1, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        d.pop("version", None)
        if fmt != FORMAT:
            raise ValueError(f"config format {fmt!r} is not {FORMAT!r}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown network config field(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


@contextlib.contextmanager
def on_edm_code_path(code_dir: str | Path | None):
    """Make the user's EDM checkout importable (``torch_utils``, ``dnnlib``, ``training``); stays importable after."""
    if code_dir is not None:
        code_dir = str(Path(code_dir).expanduser().resolve())
        if not Path(code_dir).is_dir():
            raise ValueError(f"edm_code_dir {code_dir} is not a folder (point it at your clone of NVlabs/edm)")
        if code_dir not in sys.path:
            sys.path.insert(0, code_dir)
    yield


def edm_import_error(e: ModuleNotFoundError) -> ValueError:
    return ValueError(
        f"cannot import {e.name!r} needed by the EDM network: EDM pickles and NVlabs networks need the modules of "
        "your EDM checkout (git clone NVlabs/edm); pass edm_code_dir=PATH (--edm-code-dir PATH) or put it on PYTHONPATH"
    )


def default_feature_layer(net: torch.nn.Module, arch: str) -> str:
    """The reference's AMED feature block: EDM's last 8x8 encoder block; diffusers' mid_block."""
    if arch == "diffusers-unet2d":
        return "mid_block"
    enc = getattr(net, "enc", None)
    if isinstance(enc, torch.nn.ModuleDict):
        names = [k for k in enc.keys() if k.startswith("8x8_block")]
        if names:
            return f"enc.{names[-1]}"
    if hasattr(net, "mid_block"):
        return "mid_block"
    raise ValueError(f"{type(net).__name__} has no 8x8 encoder block or mid_block; pass feature_layer='dotted.module.path'")


def get_layer(net: torch.nn.Module, layer: str) -> torch.nn.Module:
    try:
        return net.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"feature_layer {layer!r} is not a module of {type(net).__name__}") from None


def edm_labels(class_labels: torch.Tensor | None, label_dim: int, batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """EDM's label convention: one-hot (B, label_dim) floats; integer class indices are one-hot encoded."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros(batch, label_dim, dtype=like.dtype, device=like.device)
    if not class_labels.is_floating_point():
        if class_labels.ndim != 1:
            raise ValueError(f"integer class_labels must be (B,), got shape {tuple(class_labels.shape)}")
        class_labels = F.one_hot(class_labels.long(), label_dim)
    return class_labels.to(dtype=like.dtype, device=like.device).reshape(-1, label_dim)


class FeatureHookMixin:
    """Unwraps tuple outputs of the hooked block before pooling."""

    def _emit_features(self, feature_map) -> None:  # type: ignore[override]
        if self._capturing():
            value = pool_features(first_tensor(feature_map).detach().float())
            self._deliver(value)


class PreconditionedDenoiser(FeatureHookMixin, BaseDenoiser):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) around a raw network (see the module docstring).

    Step arithmetic (coefficients, skip connection) runs in x's dtype; the network in its own dtype.
    """

    def __init__(self, net: torch.nn.Module, config: NetworkConfig) -> None:
        super().__init__()
        self.net = net
        self.config = config
        self.shape = config.shape
        self.label_dim = config.label_dim
        self.sigma_min = float(config.sigma_min)
        self.sigma_max = float(config.sigma_max)
        self.data_range = config.data_range
        self.feature_layer = config.feature_layer or default_feature_layer(net, config.arch)
        get_layer(net, self.feature_layer)  # fail early on a bad name
        self.feature_source = f"{config.arch}:{self.feature_layer}"

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.config.precond.coefficients(s)
        dtype = module_dtype(self.net)
        x_in = (c_in * x).to(dtype)
        noise = c_noise.reshape(-1).to(dtype).expand(x.shape[0])
        labels = edm_labels(class_labels, self.label_dim, x.shape[0], x_in)
        if self.config.arch == "diffusers-unet2d":
            idx = None if labels is None else labels.argmax(dim=1)
            F_x = self.net(x_in, noise, class_labels=idx).sample
        else:
            F_x = self.net(x_in, noise, class_labels=labels)
        return c_skip * x + c_out * F_x.to(x.dtype)

    def _feature_module(self) -> torch.nn.Module:
        return get_layer(self.net, self.feature_layer)

    def identity(self) -> dict:
        return {
            "adapter": "edm-network",
            "name": self.config.name,
            "arch": self.config.arch,
            "precond": self.config.precond.kind,
            "feature_layer": self.feature_layer,
            "content_sha256": cached_state_dict_sha256(self, self.net),
            "shape": list(self.shape),
        }


def build_network(config: NetworkConfig, *, edm_code_dir: str | Path | None = None) -> torch.nn.Module:
    """Construct the raw network described by ``config`` (random weights)."""
    if config.arch == "tiny-unet":
        return TinyUNet(TinyUNetConfig.from_dict(config.kwargs))
    if config.arch == "diffusers-unet2d":
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise ValueError("arch 'diffusers-unet2d' needs diffusers: pip install 'amed-distill[models]'") from None
        return UNet2DModel.from_config(config.kwargs)
    with on_edm_code_path(edm_code_dir):
        try:
            module = importlib.import_module(config.nvlabs_module)
        except ModuleNotFoundError as e:
            raise edm_import_error(e) from None
    cls = getattr(module, str(config.nvlabs_class), None)
    if cls is None:
        raise ValueError(f"{config.nvlabs_module} has no class {config.nvlabs_class!r}")
    return cls(**config.kwargs)


def save_network(denoiser: PreconditionedDenoiser, out: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (atomic) so the network loads without any pickle."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in denoiser.net.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS_NAME, save(state, metadata={"format": FORMAT}))
    atomic_write_json(out / CONFIG_NAME, denoiser.config.to_dict())
    return out


def load_network(
    path: str | Path,
    *,
    edm_code_dir: str | Path | None = None,
    feature_layer: str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> PreconditionedDenoiser:
    """Load a folder written by :func:`save_network` / :func:`convert_edm_pickle` (safetensors only, no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{path} must be a folder holding {CONFIG_NAME} and {WEIGHTS_NAME} (written by `amed convert` "
                         "or `amed teacher train-tiny`)")
    from ..io import parse_json, read_limited

    raw = parse_json(read_limited(path / CONFIG_NAME, 1 << 20), str(path / CONFIG_NAME))  # bounded, regular, shallow
    if not isinstance(raw, dict):
        raise ValueError(f"{path / CONFIG_NAME} must be a JSON object (the network's config)")
    config = NetworkConfig.from_dict(raw)
    changes: dict[str, Any] = {}
    if feature_layer is not None:
        changes["feature_layer"] = feature_layer
    if sigma_min is not None:
        changes["sigma_min"] = float(sigma_min)
    if sigma_max is not None:
        changes["sigma_max"] = float(sigma_max)
    if changes:
        config = NetworkConfig.from_dict({**config.to_dict(), **changes})
    net = build_network(config, edm_code_dir=edm_code_dir)
    state = load_file(str(path / WEIGHTS_NAME))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_NAME} does not fit the network in {CONFIG_NAME}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    net.requires_grad_(False).eval()
    if dtype is not None:
        net = net.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    den = PreconditionedDenoiser(net, config).eval()
    return den.to(device) if device is not None else den
