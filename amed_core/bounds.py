"""Bounds on what a checkpoint may ask of the code that loads it, and the field checks every family's ``from_files``
uses (free, gits, amed, epd; a new family calls the same ones).

A checkpoint is untrusted input: a ``sampler.json`` with ``num_steps`` 10**9 once made ``amed sample`` allocate 8 GB,
an infinite sigma or NaN weights made it fail deep inside a solver naming no file. Every field is checked against
these bounds when the file is read (``amed fetch`` loads what it fetched, so a bad checkpoint is refused before it is
written) and each failure is one ValueError naming the file and the field::

    from amed_core.bounds import sampler_document, check_sigmas
    from amed_core.io import load_safetensors

    def from_files(files):                                    # a new family's loader
        doc = sampler_document(files["sampler.json"])         # bounded UTF-8 JSON object; nfe, num_steps, sigmas, afs
        tables = load_safetensors(files["gs.safetensors"], "gs.safetensors")   # header checked, finite
        ...

Reading the files themselves (regular files only, sizes checked first) is :mod:`amed_core.io` (local paths) and
:func:`flows.storage.reads.read_object` (fsspec URLs); :func:`checkpoint_limit` gives the size limit of a file name.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .io import MAX_JSON_BYTES, MAX_WEIGHTS_BYTES, FileRefused, parse_json

__all__ = ["MAX_NFE", "MAX_STEPS", "MAX_SIGMA", "MAX_POINTS", "check_int", "check_bool", "check_number",
           "check_sigmas", "check_sampler_fields", "sampler_document", "checkpoint_limit"]

#: The largest NFE anything accepts (the sweep schema's bound too): a typo must not become a 10**9-point grid.
MAX_NFE = 1000
#: Grid points of a sampler: NFE + 1 for one evaluation per step.
MAX_STEPS = MAX_NFE + 1
#: Noise levels: EDM's sigma_max is 80, VE models' a few hundred; beyond this a value is a typo or an attack.
MAX_SIGMA = 1e6
#: Parallel directions per step (EPD's K) and similar small per-step counts.
MAX_POINTS = 64


def check_int(value: Any, field: str, lo: int, hi: int, where: str) -> int:
    """``value`` as an int in ``lo..hi`` (a bool is not an int), else ValueError naming ``where`` and ``field``."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        shown = repr(value)
        raise ValueError(f"{where}: {field} must be an integer in {lo}..{hi} (got {shown[:40]})")
    return value


def check_bool(value: Any, field: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {field} must be true or false (got {repr(value)[:40]})")
    return value


def check_number(value: Any, field: str, where: str, *, lo: float = -math.inf, hi: float = math.inf,
                 lo_open: bool = False) -> float:
    """A finite real number in [lo, hi] (``lo_open``: (lo, hi]), else ValueError naming the field."""
    ok = hasattr(value, "__float__") and not isinstance(value, (bool, str, bytes))
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{where}: {field} must be a finite number in {rng} (got {repr(value)[:40]})")
    return float(value)


def check_sigmas(values: Any, where: str, field: str = "sigmas") -> tuple[float, ...]:
    """2..MAX_STEPS finite, positive (at most MAX_SIGMA), strictly decreasing noise levels."""
    if not isinstance(values, (list, tuple)) or not 2 <= len(values) <= MAX_STEPS:
        n = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"{where}: {field} must be a list of 2..{MAX_STEPS} noise levels (got {n})")
    out = tuple(check_number(v, f"{field}[{i}]", where, lo=0.0, hi=MAX_SIGMA, lo_open=True) for i, v in enumerate(values))
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{where}: {field} must be strictly decreasing")
    return out


def check_sampler_fields(doc: Mapping[str, Any], where: str = "sampler.json") -> Mapping[str, Any]:
    """The fields every family's sampler.json may carry, checked when present: ``nfe`` (1..MAX_NFE), ``num_steps``
    (2..MAX_STEPS), ``sigmas`` (:func:`check_sigmas`), ``afs`` (a bool), ``kind`` / ``solver`` / ``method`` (short
    strings). Family-specific fields are the family's to check. Returns ``doc``."""
    if "nfe" in doc:
        check_int(doc["nfe"], "nfe", 1, MAX_NFE, where)
    if "num_steps" in doc:
        check_int(doc["num_steps"], "num_steps", 2, MAX_STEPS, where)
    if "sigmas" in doc:
        check_sigmas(doc["sigmas"], where)
    if "afs" in doc:
        check_bool(doc["afs"], "afs", where)
    for k in ("kind", "solver", "method"):
        if k in doc and (not isinstance(doc[k], str) or len(doc[k]) > 64):
            raise ValueError(f"{where}: {k} must be a name (a short string), got {repr(doc[k])[:40]}")
    return doc


def sampler_document(raw: bytes | bytearray | memoryview | str, where: str = "sampler.json") -> dict:
    """A sampler.json's bytes as a checked JSON object: at most MAX_JSON_BYTES, UTF-8, nested at most
    ``amed_core.io.MAX_JSON_DEPTH`` levels (:func:`amed_core.io.parse_json`), an object, common fields in bounds
    (:func:`check_sampler_fields`). One ValueError naming ``where`` otherwise."""
    doc = parse_json(raw, where)
    if not isinstance(doc, dict):
        raise FileRefused(f"{where} must be a JSON object (the sampler's fields), not a {type(doc).__name__}")
    check_sampler_fields(doc, where)
    return doc


def checkpoint_limit(name: str) -> int:
    """The size limit of a checkpoint file by its name: JSON documents MAX_JSON_BYTES, weights MAX_WEIGHTS_BYTES."""
    return MAX_JSON_BYTES if name.endswith(".json") else MAX_WEIGHTS_BYTES
