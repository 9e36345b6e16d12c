"""EDM-form networks: NVlabs EDM pickles (trusted only) and the pickle-free safetensors + JSON format.

Preconditioning (Karras et al. 2022, Table 1) and the pickle-free format: :mod:`.edm_network` (its names are
re-exported here).

Two ways in:

* ``load_edm_pickle(path, trust_pickle=True, edm_code_dir=...)``: NVlabs' ``network-snapshot-*.pkl`` /
  ``edm-*.pkl`` files. They embed their own source and import ``torch_utils`` / ``dnnlib`` from the
  user's EDM checkout (``edm_code_dir`` or PYTHONPATH; we never vendor it). Unpickling runs code, so it
  is refused unless ``trust_pickle=True`` -- before the file is even opened.
* ``load_network(DIR)`` (:mod:`.edm_network`, re-exported here): ``config.json`` (:class:`NetworkConfig`) + ``model.safetensors`` (the raw network's
  state dict) for a network built from our :class:`~amed_core.tiny_unet.TinyUNet`, diffusers'
  ``UNet2DModel``, or NVlabs' classes (``SongUNet`` / ``DhariwalUNet`` constructed from the user's EDM
  checkout, then filled from safetensors: no unpickling). ``convert_edm_pickle`` writes this format once.

AMED features: the reference's last 8x8 encoder block (see :mod:`.edm_network`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

from ..base_denoiser import BaseDenoiser
from ._common import cached_state_dict_sha256
from .edm_network import __all__ as _NETWORK_NAMES
from .edm_network import (ARCHS, CONFIG_NAME, PRECOND_KINDS, WEIGHTS_NAME, FeatureHookMixin, NetworkConfig, Preconditioning,
                          PreconditionedDenoiser, build_network, default_feature_layer, edm_import_error, edm_labels,
                          get_layer, load_network, on_edm_code_path, save_network)

__all__ = [*_NETWORK_NAMES, "EDMPickleDenoiser", "PRECOND_CLASSES", "load_edm_pickle", "convert_edm_pickle"]

PRECOND_CLASSES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}


# -- NVlabs pickles ------------------------------------------------------------------------------------------------


class EDMPickleDenoiser(FeatureHookMixin, BaseDenoiser):
    """An NVlabs EDM precond network (``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond`` / ``iDDPMPrecond``) as a denoiser.

    The pickled module already computes D(x; sigma); the network runs in float32 and the result is cast back
    to x's dtype. Sigma range defaults to the reference's [0.002, 80] for every EDM checkpoint.
    """

    def __init__(self, net: torch.nn.Module, *, name: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 feature_layer: str | None = None) -> None:
        super().__init__()
        for attr in ("img_channels", "img_resolution", "label_dim", "model"):
            if not hasattr(net, attr):
                raise ValueError(f"the pickled network ({type(net).__name__}) lacks {attr!r}: not an NVlabs EDM precond module")
        self.net = net
        self.name = name
        self.shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        self.label_dim = int(net.label_dim)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.data_range = (-1.0, 1.0)  # EDM's networks are trained on images scaled to [-1, 1]
        self.feature_layer = feature_layer or default_feature_layer(net.model, "nvlabs")
        get_layer(net.model, self.feature_layer)
        self.feature_source = f"nvlabs:{self.feature_layer}"

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        labels = None if class_labels is None else edm_labels(class_labels, self.label_dim, x.shape[0], x.float())
        return self.net(x.float(), sigma.float(), labels).to(x.dtype)

    def _feature_module(self) -> torch.nn.Module:
        return get_layer(self.net.model, self.feature_layer)

    def identity(self) -> dict:
        return {"adapter": "edm-pickle", "name": self.name, "precond": type(self.net).__name__,
                "feature_layer": self.feature_layer, "content_sha256": cached_state_dict_sha256(self, self.net.model),
                "shape": list(self.shape)}


def _unpickle_edm(path: str | Path, *, trust_pickle: bool, edm_code_dir, key: str) -> torch.nn.Module:
    if trust_pickle is not True:  # refuse before touching the file
        raise ValueError(
            f"refusing to unpickle {path}: a pickle runs arbitrary code when loaded. Pass trust_pickle=True "
            "(--trust-pickle) only for a file you trust, or convert it once with `amed convert --from edm-pickle "
            "PATH --trust-pickle --out DIR` and load DIR as edm-safetensors:DIR from then on"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"EDM pickle {path} does not exist (download it yourself; see configs/presets/README.md)")
    with on_edm_code_path(edm_code_dir):
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)  # noqa: S301 - explicitly trusted by the caller
        except ModuleNotFoundError as e:
            raise edm_import_error(e) from None
    net = data.get(key) if isinstance(data, dict) else data
    if not isinstance(net, torch.nn.Module):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} holds no torch module under key {key!r} (found {keys}); pass key=")
    return net.eval().requires_grad_(False)


def load_edm_pickle(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    edm_code_dir: str | Path | None = None,
    key: str = "ema",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    feature_layer: str | None = None,
    device: str | torch.device | None = None,
) -> EDMPickleDenoiser:
    """Load an NVlabs EDM pickle (``data[key]``); refused unless ``trust_pickle=True``."""
    net = _unpickle_edm(path, trust_pickle=trust_pickle, edm_code_dir=edm_code_dir, key=key)
    den = EDMPickleDenoiser(net, name=Path(path).name, sigma_min=sigma_min, sigma_max=sigma_max, feature_layer=feature_layer)
    return den.to(device) if device is not None else den


def _init_kwargs(module: torch.nn.Module) -> dict:
    """Constructor kwargs NVlabs' ``persistence`` decorator records on every persistent module."""
    kw = getattr(module, "init_kwargs", None)
    args = getattr(module, "init_args", ())
    if kw is None or args:
        raise ValueError(f"{type(module).__name__} does not record its constructor keyword arguments (init_kwargs); "
                         "only NVlabs persistent networks can be converted")
    kw = json.loads(json.dumps(dict(kw)))  # plain JSON types (EasyDict, tuples -> lists)
    return kw


def convert_edm_pickle(
    path: str | Path,
    out: str | Path,
    *,
    trust_pickle: bool = False,
    edm_code_dir: str | Path | None = None,
    key: str = "ema",
    nvlabs_module: str = "training.networks",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    check: bool = True,
) -> Path:
    """Convert an NVlabs EDM pickle once into ``config.json`` + ``model.safetensors``; verifies the reload.

    The raw network (``net.model``, e.g. SongUNet/DhariwalUNet) is re-created from ``nvlabs_module`` of the
    user's EDM checkout with its recorded constructor kwargs, so later loads never unpickle.
    """
    net = _unpickle_edm(path, trust_pickle=trust_pickle, edm_code_dir=edm_code_dir, key=key)
    cls_name = type(net).__name__
    if cls_name not in PRECOND_CLASSES:
        raise ValueError(f"cannot convert precond class {cls_name!r}: supported {sorted(PRECOND_CLASSES)} "
                         "(load other pickles directly with trust_pickle=True)")
    kind = PRECOND_CLASSES[cls_name]
    precond = Preconditioning(
        kind=kind,
        sigma_data=float(getattr(net, "sigma_data", 0.5)),
        beta_d=float(getattr(net, "beta_d", 19.9)),
        beta_min=float(getattr(net, "beta_min", 0.1)),
        M=int(getattr(net, "M", 1000)),
    )
    pickled = EDMPickleDenoiser(net, name=Path(path).name, sigma_min=sigma_min, sigma_max=sigma_max)
    config = NetworkConfig(
        arch="nvlabs", kwargs=_init_kwargs(net.model), shape=pickled.shape, precond=precond,
        label_dim=pickled.label_dim, sigma_min=sigma_min, sigma_max=sigma_max, feature_layer=pickled.feature_layer,
        nvlabs_module=nvlabs_module, nvlabs_class=type(net.model).__name__, name=Path(path).stem,
        extra={"converted_from": Path(path).name, "precond_class": cls_name}, data_range=(-1.0, 1.0),
    )
    out = save_network(PreconditionedDenoiser(net.model, config), out)
    if check:
        loaded = load_network(out, edm_code_dir=edm_code_dir)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, *pickled.shape, generator=gen)
        labels = None
        if pickled.label_dim:
            labels = F.one_hot(torch.arange(2) % pickled.label_dim, pickled.label_dim).float()
        with torch.no_grad():
            for s in (0.05, 1.0, 20.0):
                a, b = pickled(x * s, s, labels), loaded(x * s, s, labels)
                err = (a - b).abs().max().item()
                if not err <= 1e-4 * max(1.0, a.abs().max().item()):
                    raise ValueError(f"converted network disagrees with the pickle at sigma={s} (max |diff| {err:.3g}); "
                                     f"the precond {cls_name} may use options this converter does not know")
    return out
