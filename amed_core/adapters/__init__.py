"""Adapters from real diffusion models to the denoiser protocol ``D(x, sigma, class_labels) -> x0_hat``.

Teacher names (resolved by :func:`load_teacher`, the teacher registry, options forwarded as keywords):

==========================  =====================================================================================
``digits-gmm``               the exact Gaussian mixture of the digits shipped with the package (:mod:`.gmm`)
``gmm:PATH.npz``             any mixture file with ``weights``, ``means``, ``covs``, ``shape`` (no pickles)
``tiny-unet:DIR``            our tiny digits UNet (``amed teacher train-tiny --out DIR``); same format as below
``edm-safetensors:DIR``      EDM-form network from ``config.json`` + ``model.safetensors`` (``amed convert``)
``edm:PATH.pkl``             NVlabs EDM pickle; needs ``trust_pickle=True`` and the EDM code (``edm_code_dir``)
``diffusers:PATH_OR_ID``     diffusers pipeline / UNet folder, or a hub id already in the user's cache
``digits-tiny-unet``         the tiny digits UNet shipped with the package (trained by ``train_tiny``)
``photos-tiny-unet``         the 32x32 RGB UNet on photo crops shipped with the package (``amed teacher train-photos``)
``py:PKG.MODULE:FUNCTION``   your own model: ``FUNCTION(**options)`` returns ``wrap_model(...)`` (:mod:`.custom`);
                             importing runs that module's code: name only modules you trust
==========================  =====================================================================================

Pure torch: diffusers / transformers are imported lazily inside the diffusers adapter only.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Mapping

from ..base_denoiser import BaseDenoiser
from ._common import check_options
from .custom import (CustomDenoiser, VPTime, cast_like, content_sha256, load_py_teacher, pool_feature_map, to_dtype,
                     wrap_model)
from .gmm import GaussianMixtureDenoiser
from .edm import (
    EDMPickleDenoiser,
    NetworkConfig,
    Preconditioning,
    PreconditionedDenoiser,
    convert_edm_pickle,
    load_edm_pickle,
    load_network,
    save_network,
)

__all__ = [
    "load_teacher",
    "BUILTIN_TEACHERS",
    "GaussianMixtureDenoiser",
    "TEACHER_PREFIXES",
    "BUILTIN_NETWORKS",
    "load_adapter",
    "expand_paths",
    "expand_py_options",
    "builtin_network_dir",
    "EDMPickleDenoiser",
    "NetworkConfig",
    "Preconditioning",
    "PreconditionedDenoiser",
    "convert_edm_pickle",
    "load_edm_pickle",
    "load_network",
    "save_network",
    "CustomDenoiser",
    "VPTime",
    "wrap_model",
    "content_sha256",
    "to_dtype",
    "cast_like",
    "pool_feature_map",
    "load_py_teacher",
]

_NETWORK_OPTIONS = ("edm_code_dir", "feature_layer", "sigma_min", "sigma_max", "device", "dtype")
_PICKLE_OPTIONS = ("trust_pickle", "edm_code_dir", "key", "sigma_min", "sigma_max", "feature_layer", "device")
_DIFFUSERS_OPTIONS = ("subfolder", "guidance_scale", "prompts", "max_prompts", "negative_prompt", "prompt_embeds", "negative_prompt_embeds",
                      "prediction_type", "feature_layer", "local_files_only", "cache_dir", "device", "dtype", "epsilon_t",
                      "sigma_min", "sigma_max")

TEACHER_PREFIXES = {
    "tiny-unet": _NETWORK_OPTIONS,
    "edm-safetensors": _NETWORK_OPTIONS,
    "edm": _PICKLE_OPTIONS,
    "diffusers": _DIFFUSERS_OPTIONS,
}

BUILTIN_NETWORKS = {"digits-tiny-unet": "tiny_unet_digits", "photos-tiny-unet": "tiny_unet_photos"}
BUILTIN_TEACHERS = {"digits-gmm": "digits.npz"}  # analytic mixtures shipped in amed_core/data


def _data_path(name: str) -> Path:
    return Path(str(resources.files("amed_core") / "data" / name))


def builtin_network_dir(name: str) -> Path:
    return _data_path(BUILTIN_NETWORKS[name])


def load_teacher(spec: str, **kwargs) -> BaseDenoiser:
    """Resolve a teacher name: ``digits-gmm`` (built in), ``gmm:PATH.npz`` (any mixture file), or a real network
    (``digits-tiny-unet``, ``tiny-unet:DIR``, ``edm-safetensors:DIR``, ``edm:PATH.pkl``, ``diffusers:PATH_OR_ID``;
    see the module docstring), keyword options forwarded (e.g. ``trust_pickle``, ``guidance_scale``, ``prompts``)."""
    if spec in BUILTIN_TEACHERS:
        kwargs.setdefault("data_range", (-1.0, 1.0))  # the digits were scaled to [-1, 1]
        return GaussianMixtureDenoiser.from_npz(_data_path(BUILTIN_TEACHERS[spec]), name=spec, **kwargs)
    if spec.startswith("gmm:"):
        return GaussianMixtureDenoiser.from_npz(spec[4:], **kwargs)
    if spec.startswith("py:"):  # the user's own model (importing runs its code); ~ and $VARS in its options expanded
        return load_py_teacher(spec[3:], **expand_py_options(kwargs))
    if spec in BUILTIN_NETWORKS or spec.partition(":")[0] in TEACHER_PREFIXES:
        return load_adapter(spec, **kwargs)
    raise ValueError(
        f"unknown teacher {spec!r}: use one of {sorted(BUILTIN_TEACHERS) + sorted(BUILTIN_NETWORKS)}, gmm:PATH.npz "
        f"(a mixture file with weights, means, covs, shape), {sorted(p + ':...' for p in TEACHER_PREFIXES)} or "
        "py:PKG.MODULE:FUNCTION (your own model through amed_core.adapters.wrap_model)"
    )


_PATH_OPTIONS = ("edm_code_dir", "cache_dir", "prompt_embeds", "prompts")


def _expand(field: str, value):
    """``~`` and ``$VARS`` in paths (sweep files name checkpoints through environment variables)."""
    if not isinstance(value, str):
        return value
    out = os.path.expandvars(value)
    missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
    if missing:
        raise ValueError(f"{field}: environment variable {missing[0]} is not set (export it, e.g. to your checkpoint's path)")
    return os.path.expanduser(out) if not out.startswith(("http://", "https://", "s3://", "gs://")) else out


def expand_py_options(options: Mapping) -> dict:
    """A ``py:`` teacher's options with ``~`` and ``$VARS`` expanded in every string (and in strings inside lists):
    its builder's options are not known to be paths or not, so any string naming a variable or starting with ``~``
    is expanded; an unset variable is an error naming the option. Strings without either are unchanged."""

    def one(field: str, v):
        if isinstance(v, str) and (v.startswith("~") or re.search(r"\$\{?[A-Za-z_]", v)):
            return _expand(field, v)
        if isinstance(v, (list, tuple)):
            return type(v)(one(f"{field}[{i}]", x) for i, x in enumerate(v))
        return v

    return {k: one(f"options.{k}", v) for k, v in dict(options).items()}


def expand_paths(spec: str, options: Mapping) -> tuple[str, dict]:
    """``spec`` and ``options`` with ``~`` and ``$VARS`` expanded where :func:`load_adapter` expands them (the
    argument after a model prefix, path options, ``weights_url``; every string option of a ``py:`` teacher,
    :func:`expand_py_options`), so a planned teacher loads on machines (remote Ray workers) that lack the variables.
    Other teachers and options are returned unchanged."""
    options = dict(options)
    if spec.startswith("py:"):
        return spec, expand_py_options(options)
    if spec in BUILTIN_NETWORKS or spec.partition(":")[0] not in TEACHER_PREFIXES:
        return spec, options
    prefix, sep, arg = spec.partition(":")
    if arg:
        spec = f"{prefix}{sep}{_expand('teacher', arg)}"
    return spec, {k: _expand(k, v) if k in _PATH_OPTIONS + ("weights_url",) else v for k, v in options.items()}


def load_adapter(spec: str, **options):
    """Resolve ``prefix:ARG`` (see the module docstring) or a built-in network name to a denoiser.

    ``weights_url=PATH`` with a bare prefix (``teacher: edm-safetensors`` in a sweep) is the same as ``prefix:PATH``.
    """
    if spec in BUILTIN_NETWORKS:
        check_options(f"teacher {spec!r}", options, _NETWORK_OPTIONS)
        return load_network(builtin_network_dir(spec), **options)
    prefix, _, arg = spec.partition(":")
    arg = _expand("teacher", arg)
    options = {k: _expand(k, v) if k in _PATH_OPTIONS else v for k, v in options.items()}
    weights_url = options.pop("weights_url", None)
    if weights_url is not None:  # SweepConfig's datasets[].weights_url: the checkpoint as a parameter
        if arg:
            raise ValueError(f"teacher {spec!r} already names its weights; drop weights_url or use the bare name {prefix!r}")
        weights_url = _expand("weights_url", str(weights_url))
        if weights_url.startswith("file://"):
            weights_url = weights_url[len("file://"):]
        if "://" in weights_url:
            raise ValueError(f"weights_url {weights_url!r}: amed never downloads weights; fetch the file yourself and "
                             "pass its local path")
        arg = str(Path(weights_url).expanduser())
    if prefix not in TEACHER_PREFIXES or not arg:
        raise ValueError(f"teacher {spec!r}: expected a path (prefix:PATH or weights_url=PATH) with one of {sorted(f'{p}:...' for p in TEACHER_PREFIXES)} or {sorted(BUILTIN_NETWORKS)}")
    check_options(f"teacher {prefix}:", options, TEACHER_PREFIXES[prefix])
    if prefix in ("tiny-unet", "edm-safetensors"):
        return load_network(arg, **options)
    if prefix == "edm":
        return load_edm_pickle(arg, **options)
    from .diffusers_adapter import load_diffusers

    return load_diffusers(arg, **options)
