"""Family ``amed``: AMED-Solver / AMED-Plugins (arXiv 2312.00094), a small predictor trained on the stored teacher at
the student's grid (:mod:`amed_core.amed`); checkpoint ``predictor.safetensors`` + ``sampler.json`` (SamplerSpec)."""

from __future__ import annotations

from typing import Mapping

name = "amed"
needs_teacher = True
trains = True
teacher_grid = "student"
files = ("predictor.safetensors", "sampler.json")


def fit(denoiser, spec, cfg, batches, callback=None):
    """Train (:func:`amed_core.amed.train.train_amed`) and return the Sampler."""
    from ..amed import Sampler
    from ..amed.train import train_amed

    res = train_amed(denoiser, spec, cfg, batches, callback=callback)
    return Sampler(spec, res.predictor.cpu())


def from_files(files: Mapping[str, bytes]):
    from ..amed import sampler_from_files

    return sampler_from_files(files)


def to_files(sampler) -> dict[str, bytes]:
    return sampler.files()


def describe(sampler) -> dict:
    s = sampler.spec
    return {"family": "amed", "method": s.solver, "solver": s.solver, "nfe": int(s.nfe), "denoiser_calls": int(s.nfe),
            "num_steps": int(s.num_steps), "afs": bool(s.afs)}
