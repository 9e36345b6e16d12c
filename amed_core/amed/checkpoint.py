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
from safetensors.torch import save as st_save

from ..bounds import checkpoint_limit, sampler_document
from ..io import (MAX_JSON_BYTES, MAX_WEIGHTS_BYTES, atomic_write_bytes, load_safetensors, read_limited,
                  safetensors_layout)
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
MAX_SPEC_BYTES = MAX_JSON_BYTES
MAX_PREDICTOR_BYTES = MAX_WEIGHTS_BYTES


def _spec_from_bytes(raw) -> SamplerSpec:
    spec_dict = sampler_document(raw, SPEC_FILE)  # bounded, UTF-8, shallow, an object, common fields in bounds
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
    stored = safetensors_layout(data, PREDICTOR_FILE)
    with torch.device("meta"):  # shapes only: a config asking for huge layers allocates nothing here
        want = {k: tuple(v.shape) for k, v in AMEDPredictor(spec.predictor, seed=None).state_dict().items()}
    if {k: shape for k, (_, shape) in stored.items()} != want:
        diff = sorted(set(want) ^ set(stored)) or sorted(k for k in want if want[k] != stored[k][1])
        raise ValueError(f"{PREDICTOR_FILE} does not fit {SPEC_FILE}'s predictor config (tensors {diff[:4]} differ); "
                         "the two files come from different checkpoints")
    state = load_safetensors(data, PREDICTOR_FILE)  # NaN/inf weights refused here, naming the file
    predictor = AMEDPredictor(spec.predictor, seed=None)  # every tensor comes from the strict load below
    try:
        predictor.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"predictor weights do not fit sampler.json's predictor config: {str(e)[:200]}") from None
    return Sampler(spec, predictor)


def load_sampler(directory: str | os.PathLike) -> Sampler:
    """Load a checkpoint directory written by :func:`save_checkpoint`."""
    d = Path(directory)
    if not os.path.lexists(d / SPEC_FILE):
        raise ValueError(f"{d} is not an AMED checkpoint (no {SPEC_FILE}); train one with `amed train --out DIR`")
    files = {}
    for name in (PREDICTOR_FILE, SPEC_FILE):  # regular files only, sizes checked before reading (amed_core.io)
        try:
            files[name] = read_limited(d / name, checkpoint_limit(name), what=name)
        except FileNotFoundError:
            pass
    return sampler_from_files(files)
