"""Checkpoints: ``predictor.safetensors`` (weights) + ``sampler.json`` (SamplerSpec). Loading never unpickles.

``checkpoint_files(predictor, spec)`` gives the bytes (what a store or a registry keeps),
``save_checkpoint(dir, predictor, spec)`` writes them atomically, ``load_sampler(dir)`` and
``sampler_from_files(files)`` rebuild a :class:`Sampler`:

    sampler = load_sampler("runs/amed-nfe5")
    images = sampler(denoiser, noise).x          # noise (B, C, H, W) standard normal
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..io import atomic_write_bytes
from ..solvers import SolveResult
from .predictor import AMEDPredictor
from ..methods import get_solver
from .spec import SamplerSpec

__all__ = ["PREDICTOR_FILE", "SPEC_FILE", "checkpoint_files", "save_checkpoint", "load_sampler", "sampler_from_files",
           "Sampler"]

PREDICTOR_FILE = "predictor.safetensors"
SPEC_FILE = "sampler.json"


class Sampler:
    """A learned sampler: ``sampler(denoiser, noise, class_labels=None) -> SolveResult`` (x at sigma_min, NFE).

    The run starts at noise * sigma_max of the spec's grid, uses no autograd, and (by default) checks that
    the denoiser is the teacher the predictor was trained for (content hash in ``spec.teacher``).
    """

    def __init__(self, spec: SamplerSpec, predictor: AMEDPredictor):
        if predictor.config != spec.predictor:
            raise ValueError("predictor config disagrees with spec.predictor; build the predictor from the spec")
        self.spec = spec
        self.predictor = predictor.eval().requires_grad_(False)

    def check_denoiser(self, denoiser) -> None:
        want = self.spec.teacher.get("content_sha256")
        ident = denoiser.identity() if hasattr(denoiser, "identity") else {}
        have = ident.get("content_sha256")
        if want and have and want != have:
            raise ValueError(f"this sampler was trained for teacher {self.spec.teacher.get('name')!r} "
                             f"(sha256 {want[:12]}...) but got {ident.get('name')!r} ({have[:12]}...); "
                             "pass check_teacher=False to sample anyway")

    def __call__(self, denoiser, noise: torch.Tensor, class_labels=None, *, check_teacher: bool = True,
                 return_trajectory: bool = False, callback=None, policy=None) -> SolveResult:
        if check_teacher:
            self.check_denoiser(denoiser)
        grid = self.spec.grid()
        x = noise * grid[0].to(noise.dtype)
        with torch.no_grad():
            return get_solver(self.spec.solver)(denoiser, x, grid, policy=policy or self.predictor, class_labels=class_labels,
                                                return_trajectory=return_trajectory, callback=callback,
                                                **self.spec.solver_options())

    def files(self) -> dict[str, bytes]:
        return checkpoint_files(self.predictor, self.spec)


def checkpoint_files(predictor: AMEDPredictor, spec: SamplerSpec) -> dict[str, bytes]:
    """{"predictor.safetensors": weights, "sampler.json": spec} as bytes."""
    if predictor.config != spec.predictor:
        raise ValueError("predictor config disagrees with spec.predictor")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in predictor.state_dict().items()}
    # One metadata key: safetensors writes several in a random order, so equal weights would give unequal bytes
    # (and unequal checksums in the store and the registry).
    about = json.dumps({"format": "amed-predictor", "kind": spec.kind, "solver": spec.solver}, sort_keys=True)
    weights = st_save(tensors, metadata={"amed": about})
    return {PREDICTOR_FILE: weights, SPEC_FILE: (spec.to_json() + "\n").encode()}


def save_checkpoint(directory: str | os.PathLike, predictor: AMEDPredictor, spec: SamplerSpec) -> Path:
    """Write predictor.safetensors and sampler.json into ``directory`` (created), each atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Weights first, spec last: a directory with a sampler.json is complete.
    files = checkpoint_files(predictor, spec)
    atomic_write_bytes(d / PREDICTOR_FILE, files[PREDICTOR_FILE])
    atomic_write_bytes(d / SPEC_FILE, files[SPEC_FILE])
    return d


# Limits on what a checkpoint may ask of the loader (a predictor is ~9k parameters; a spec a few KiB): checked
# before anything is parsed or allocated, so a hostile or broken file fails with one line, not an allocation.
MAX_SPEC_BYTES = 1 << 20
MAX_PREDICTOR_BYTES = 256 << 20
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _safetensors_header(data: bytes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors buffer, checked against its length before safetensors reads it:
    header size, JSON, dtypes, shapes and data offsets (contiguous, in bounds, the size each shape needs)."""
    import struct

    where = PREDICTOR_FILE
    if len(data) < 8:
        raise ValueError(f"{where} is {len(data)} bytes: truncated or empty (re-fetch or re-train the checkpoint)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > len(data) - 8 or n > MAX_SPEC_BYTES:
        raise ValueError(f"{where}: its header claims {n} bytes but the file has {len(data) - 8} after the length "
                         "(truncated or not a safetensors file)")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{where}: the header is not JSON (not a safetensors file; pickles and .pt files are never "
                         "loaded)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the header is not a JSON object (not a safetensors file)")
    body = len(data) - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in _ST_DTYPES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise ValueError(f"{where}: tensor {name[:60]!r} has a malformed entry (dtype, shape, data_offsets)")
        lo, hi = info["data_offsets"]
        size = _ST_DTYPES[info["dtype"]]
        for d in info["shape"]:
            size *= d
        if not 0 <= lo <= hi <= body or hi - lo != size:
            raise ValueError(f"{where}: tensor {name[:60]!r} claims bytes {lo}..{hi} of {body} for shape {info['shape']} "
                             "(truncated, or the offsets lie)")
        spans.append((lo, hi))
        out[name] = (info["dtype"], tuple(info["shape"]))
    pos = 0
    for lo, hi in sorted(spans):
        if lo != pos:
            raise ValueError(f"{where}: tensor data overlaps or leaves gaps (offsets {lo}, expected {pos})")
        pos = hi
    if pos != body:
        raise ValueError(f"{where}: {body - pos} bytes after the last tensor (corrupted or appended to)")
    return out


def _spec_from_bytes(raw) -> SamplerSpec:
    if len(raw) > MAX_SPEC_BYTES:
        raise ValueError(f"{SPEC_FILE} is {len(raw)} bytes; a sampler spec is at most {MAX_SPEC_BYTES} (not a sampler.json)")
    try:
        spec_dict = json.loads(raw.decode() if isinstance(raw, (bytes, bytearray, memoryview)) and not isinstance(raw, str)
                               else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{SPEC_FILE} is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(spec_dict, dict):
        raise ValueError(f"{SPEC_FILE} must be a JSON object (SamplerSpec fields), not a {type(spec_dict).__name__}")
    if spec_dict.get("kind", "amed") != "amed":
        raise ValueError(f"sampler kind {str(spec_dict.get('kind'))[:60]!r} is not an AMED sampler")
    try:
        return SamplerSpec.from_dict(spec_dict)
    except ValueError as e:
        raise ValueError(f"{SPEC_FILE}: {str(e)[:300]}") from None
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{SPEC_FILE} has fields of the wrong type or shape ({str(e)[:200]}); write it with "
                         "save_checkpoint / amed train") from None


def sampler_from_files(files: Mapping[str, bytes]) -> Sampler:
    """Rebuild a Sampler from checkpoint bytes (safetensors + JSON only; nothing is unpickled).

    Sizes are checked before anything is allocated: the spec's predictor config must give exactly the tensors (names
    and shapes) the weights file holds; a malformed file raises one ValueError naming the file."""
    missing = {PREDICTOR_FILE, SPEC_FILE} - set(files)
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)}; it needs {PREDICTOR_FILE} and {SPEC_FILE}")
    spec = _spec_from_bytes(files[SPEC_FILE])
    data = bytes(files[PREDICTOR_FILE])
    if len(data) > MAX_PREDICTOR_BYTES:
        raise ValueError(f"{PREDICTOR_FILE} is {len(data)} bytes; an AMED predictor is far smaller (wrong file?)")
    stored = _safetensors_header(data)
    with torch.device("meta"):  # shapes only: a config asking for huge layers allocates nothing here
        want = {k: tuple(v.shape) for k, v in AMEDPredictor(spec.predictor, seed=None).state_dict().items()}
    if {k: shape for k, (_, shape) in stored.items()} != want:
        diff = sorted(set(want) ^ set(stored)) or sorted(k for k in want if want[k] != stored[k][1])
        raise ValueError(f"{PREDICTOR_FILE} does not fit {SPEC_FILE}'s predictor config (tensors {diff[:4]} differ); "
                         "the two files come from different checkpoints")
    try:
        state = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors' own error type, as one line
        raise ValueError(f"{PREDICTOR_FILE} is not a valid safetensors file ({str(e)[:160]})") from None
    predictor = AMEDPredictor(spec.predictor, seed=None)  # every tensor comes from the strict load below
    try:
        predictor.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"predictor weights do not fit sampler.json's predictor config: {str(e)[:200]}") from None
    return Sampler(spec, predictor)


def _read_small(path: Path, limit: int) -> bytes:
    """A regular file of at most ``limit`` bytes (a FIFO or device would block; a huge file is not a checkpoint)."""
    import stat

    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if st.st_size > limit:
        raise ValueError(f"{path} is {st.st_size} bytes; at most {limit} are read for a checkpoint file")
    return path.read_bytes()


def load_sampler(directory: str | os.PathLike) -> Sampler:
    """Load a checkpoint directory written by :func:`save_checkpoint`."""
    d = Path(directory)
    if not (d / SPEC_FILE).exists():
        raise ValueError(f"{d} is not an AMED checkpoint (no {SPEC_FILE}); train one with `amed train --out DIR`")
    limits = {PREDICTOR_FILE: MAX_PREDICTOR_BYTES, SPEC_FILE: MAX_SPEC_BYTES}
    return sampler_from_files({name: _read_small(d / name, limits[name]) for name in (PREDICTOR_FILE, SPEC_FILE)
                               if (d / name).exists()})
