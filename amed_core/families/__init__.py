"""Method families as first-class citizens: one module per family (``free``, ``gits``, ``amed``, ``epd``, ``gs``), each a
:class:`Family` that says how to plan its work, fits a sampler, writes/reads its checkpoint and samples.

Every family's checkpoint is a dict of files with a ``sampler.json`` whose ``kind`` names the family; a family with
weights adds safetensors files (``amed``: ``predictor.safetensors``; ``epd``: ``epd.safetensors`` + ``epd.json``;
``gs``: ``gs.safetensors``),
a family without weights saves only JSON (``free``: solver + explicit sigmas + options; ``gits``: base solver + the
selected sigmas + options + how they were selected). Nothing is unpickled.

    from amed_core.families import sampler_from_files, load_sampler, describe
    sampler = load_sampler("ckpt/")                 # any family
    x = sampler(denoiser, noise).x                   # noise (B, C, H, W) standard normal
    describe(sampler)                                # {"family", "method", "nfe", "denoiser_calls", "num_steps"}

Adding a family is adding a module here with the :class:`Family` attributes and a line in :data:`FAMILY_MODULES`
(plus its entries in the method table, :mod:`amed_core.methods.table`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

from ..io import atomic_write_bytes
from . import amed, epd, free, gits, gs
from .static import SPEC_FILE, PureSchedule, StaticSampler, StaticSpec

__all__ = ["Family", "FAMILY_MODULES", "SPEC_FILE", "StaticSampler", "StaticSpec", "get_family", "family_of",
           "checkpoint_kind", "checkpoint_names", "sampler_from_files", "load_sampler", "save_sampler", "describe",
           "sampler_files", "PureSchedule", "pure_schedule"]


@runtime_checkable
class Family(Protocol):
    """What a family module provides (module attributes and functions).

    name: the family (``METHODS[m].family``); needs_teacher: reads stored teacher trajectories; trains: has weights
    fitted by gradient steps; teacher_grid: which teacher grid it reads (``"student"``: the states at the student's
    own grid points; ``"fine"``: every point of the stored teacher grid; ``"final"``: only the noise and the last
    state; None: no teacher); files: the checkpoint
    file names; ``from_files(files) -> sampler``; ``to_files(sampler) -> {name: bytes}``; ``describe(sampler)``.
    """

    name: str
    needs_teacher: bool
    trains: bool
    teacher_grid: str | None
    files: tuple[str, ...]

    def from_files(self, files: Mapping[str, bytes]) -> Any: ...

    def to_files(self, sampler) -> dict[str, bytes]: ...

    def describe(self, sampler) -> dict: ...


# Optional in a family module: ``schedule(sampler) -> PureSchedule`` where the sampler is a sigma list run by a
# training-free solver (free, gits; GS's grid), so the exports of amed_core.integrations can hand it to diffusers /
# k-diffusion / a sigmas.json. Families without it (amed, epd: per-step learned parts) are refused by the exports.


FAMILY_MODULES = {"free": free, "gits": gits, "amed": amed, "epd": epd, "gs": gs}


def get_family(name: str):
    """The family module of ``name`` (ValueError naming the choices)."""
    try:
        return FAMILY_MODULES[name]
    except KeyError:
        raise ValueError(f"unknown method family {name!r}; choose one of {sorted(FAMILY_MODULES)}") from None


def family_of(method: str) -> str:
    """The family of a method name in the table (``gits+ipndm`` -> ``gits``)."""
    from ..methods import get_method

    return get_method(method).family


def checkpoint_kind(spec_json: bytes | str | Mapping) -> str:
    """The family a ``sampler.json`` belongs to (its ``kind``; AMED specs before families were ``amed`` too)."""
    if isinstance(spec_json, Mapping):
        doc = spec_json
    else:
        raw = spec_json.decode() if isinstance(spec_json, (bytes, bytearray, memoryview)) else spec_json
        try:
            doc = json.loads(bytes(raw).decode() if isinstance(raw, memoryview) else raw)
        except ValueError as e:
            raise ValueError(f"{SPEC_FILE} is not JSON: {e}") from None
    if not isinstance(doc, Mapping):
        raise ValueError(f"{SPEC_FILE} must hold a JSON object")
    kind = doc.get("kind", "amed")
    get_family(kind)
    return str(kind)


def checkpoint_names(kind: str) -> tuple[str, ...]:
    """The files a checkpoint of family ``kind`` consists of (``sampler.json`` always among them)."""
    return tuple(get_family(kind).files)


def sampler_from_files(files: Mapping[str, bytes]):
    """A sampler of any family from its checkpoint bytes (dispatch on ``sampler.json``'s ``kind``)."""
    if SPEC_FILE not in files:
        raise ValueError(f"checkpoint lacks {SPEC_FILE}")
    return get_family(checkpoint_kind(files[SPEC_FILE])).from_files(files)


def load_sampler(directory: str | os.PathLike):
    """Load a checkpoint folder of any family."""
    d = Path(directory)
    if not (d / SPEC_FILE).is_file():
        raise ValueError(f"{d} is not a sampler checkpoint (no {SPEC_FILE})")
    kind = checkpoint_kind((d / SPEC_FILE).read_bytes())
    return sampler_from_files({n: (d / n).read_bytes() for n in checkpoint_names(kind) if (d / n).exists()})


def sampler_files(sampler) -> dict[str, bytes]:
    """The checkpoint bytes of a sampler of any family."""
    return get_family(_kind(sampler)).to_files(sampler)


def save_sampler(directory: str | os.PathLike, sampler) -> Path:
    """Write a sampler's checkpoint into ``directory`` (weights first, ``sampler.json`` last: complete once it exists)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = sampler_files(sampler)
    for name in sorted(files, key=lambda n: n == SPEC_FILE):
        atomic_write_bytes(d / name, files[name])
    return d


def describe(sampler) -> dict:
    """{"family", "method", "nfe" (the method's reported NFE), "denoiser_calls" (per sample), "num_steps", ...}."""
    return get_family(_kind(sampler)).describe(sampler)


def pure_schedule(sampler) -> PureSchedule | None:
    """The sampler as a :class:`PureSchedule` (sigmas + the free solver run on them) when its family is a pure
    schedule (its module has ``schedule(sampler)``), else None (amed, epd)."""
    fn = getattr(get_family(_kind(sampler)), "schedule", None)
    return fn(sampler) if fn is not None else None


def _kind(sampler) -> str:
    return str(getattr(sampler.spec, "kind", "amed"))
