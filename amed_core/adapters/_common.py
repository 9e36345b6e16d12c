"""Small helpers shared by the model adapters: content hashes, option checks, tensors and dtypes (atomic writes:
:mod:`amed_core.io`)."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

__all__ = ["state_dict_sha256", "cached_state_dict_sha256", "check_options", "first_tensor", "module_dtype"]


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every parameter and buffer, in sorted name order.

    Independent of how the weights were stored (pickle or safetensors), so a converted network keeps its hash.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_state_dict_sha256(owner, module: torch.nn.Module) -> str:
    """:func:`state_dict_sha256`, recomputed only when a tensor changed (tensor version counters as the key).

    Samplers check the teacher's identity on every call; hashing a multi-GB UNet each time would dominate.
    """
    key = tuple((name, t.data_ptr(), t._version) for name, t in module.state_dict(keep_vars=True).items())
    cached = getattr(owner, "_sha256_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, state_dict_sha256(module))
        object.__setattr__(owner, "_sha256_cache", cached)
    return cached[1]


def check_options(where: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """ValueError naming unknown keyword options and the allowed ones."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{where} has no option(s) {unknown}; allowed: {sorted(allowed)}")


def first_tensor(out) -> torch.Tensor:
    """A block's output as one tensor (diffusers blocks may return tuples or output objects)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    sample = getattr(out, "sample", None)
    if torch.is_tensor(sample):
        return sample
    raise ValueError(f"feature layer returned {type(out).__name__}, not a tensor; choose another feature_layer")


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32
