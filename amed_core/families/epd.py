"""Family ``epd``: EPD-Solver / EPD-Plugin (Zhu et al., ICCV 2025; :mod:`amed_core.methods.epd`), small tables trained
on the stored teacher at the student's grid. Checkpoint: ``epd.safetensors`` + ``epd.json`` (the tables) and
``sampler.json`` (kind, method, NFE, sigmas, options, teacher). NFE is the paper's parallel count 2 (N - 1) - afs;
``denoiser_calls`` = (N - 1)(K + 1) - afs, what one GPU pays."""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from .static import SPEC_FILE
from .static import check_teacher as _check_teacher

name = "epd"
needs_teacher = True
trains = True
teacher_grid = "student"
files = ("epd.safetensors", "epd.json", SPEC_FILE)


class EPDSampler:
    """``sampler(denoiser, noise, class_labels=None) -> EPDResult`` on the stored sigmas from ``noise * sigmas[0]``."""

    def __init__(self, params, spec: dict):
        self.params = params.eval().requires_grad_(False)
        self.spec = _Spec(spec)

    def __call__(self, denoiser, noise, class_labels=None, *, check_teacher: bool = True, return_trajectory=False,
                 callback=None):
        from ..methods import get_solver

        if check_teacher:
            _check_teacher(self.spec.teacher, denoiser, "EPD")
        sigmas = self.spec.grid()
        with torch.no_grad():
            return get_solver(self.spec.method)(denoiser, noise * sigmas[0], sigmas, policy=self.params,
                                                class_labels=class_labels, afs=self.spec.afs,
                                                return_trajectory=return_trajectory, callback=callback,
                                                **self.spec.options)

    def to(self, device):
        self.params.to(device)
        return self

    def files(self) -> dict[str, bytes]:
        from ..methods.epd import epd_files

        out = epd_files(self.params.cpu(), self.spec.doc)
        out[SPEC_FILE] = (json.dumps(self.spec.doc, indent=2, sort_keys=True) + "\n").encode()
        return out


class _Spec:
    def __init__(self, doc: Mapping[str, Any]):
        self.doc = dict(doc)
        self.kind = "epd"
        self.method = self.doc["method"]
        self.solver = self.method
        self.nfe = int(self.doc["nfe"])
        self.sigmas = tuple(float(v) for v in self.doc["sigmas"])
        self.afs = bool(self.doc.get("afs", False))
        self.options = dict(self.doc.get("options") or {})
        self.teacher = dict(self.doc.get("teacher") or {})
        self.num_points = int(self.doc["num_points"])

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def grid(self) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float64)


def spec_doc(method: str, nfe: int, sigmas, *, afs: bool, options: Mapping | None, num_points: int,
             teacher: Mapping | None = None, train: Mapping | None = None) -> dict:
    from ..methods import nfe_for

    sig = [float(v) for v in sigmas]
    if nfe_for(method, len(sig), afs) != nfe:
        raise ValueError(f"{method} on {len(sig)} points (afs={afs}) has NFE {nfe_for(method, len(sig), afs)}, not {nfe}")
    return {"kind": "epd", "format_version": 1, "method": method, "solver": method, "num_steps": len(sig),
            "nfe": int(nfe), "sigmas": sig, "afs": bool(afs),
            "options": dict(options or {}), "num_points": int(num_points), "teacher": dict(teacher or {}),
            "train": dict(train or {})}


def fit(denoiser, sigmas, batches, cfg, *, nfe: int, teacher: Mapping | None = None, callback=None, params=None,
        validation=None):
    """Train EPD tables (:func:`amed_core.methods.epd.train_epd`; ``params``: the start, ``validation``: held-out
    trajectories) and return (EPDSampler, EPDTrainResult)."""
    from ..methods.epd import train_epd

    res = train_epd(denoiser, sigmas, batches, cfg, callback=callback, params=params, validation=validation)
    opts = {k: v for k, v in cfg.sampler_options().items() if k != "afs"}
    doc = spec_doc(cfg.solver, nfe, sigmas, afs=cfg.afs, options=opts, num_points=cfg.num_points,
                   teacher=teacher or (denoiser.identity() if hasattr(denoiser, "identity") else {}),
                   train=cfg.to_dict())
    return EPDSampler(res.params.cpu(), doc), res


def from_files(files: Mapping[str, bytes]) -> EPDSampler:
    from ..methods.epd import epd_from_files

    missing = sorted(set(globals()["files"]) - set(files))
    if missing:
        raise ValueError(f"EPD checkpoint lacks {missing}")
    params, _ = epd_from_files(files)
    doc = json.loads(bytes(files[SPEC_FILE]).decode())
    if doc.get("kind") != "epd":
        raise ValueError(f"{SPEC_FILE} kind {doc.get('kind')!r} is not 'epd'")
    return EPDSampler(params, doc)


def to_files(sampler: EPDSampler) -> dict[str, bytes]:
    return sampler.files()


def describe(sampler: EPDSampler) -> dict:
    from ..methods.epd import epd_total_evals

    s = sampler.spec
    return {"family": "epd", "method": s.method, "solver": s.method, "nfe": s.nfe,
            "denoiser_calls": epd_total_evals(s.num_steps, s.num_points, s.afs), "num_steps": s.num_steps,
            "afs": s.afs, "num_points": s.num_points, "options": dict(s.options)}
