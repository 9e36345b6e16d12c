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


def fit_best(denoiser, spec, cfgs, batches_for, *, init_r=None, validation=None, callback=None, device="cpu"):
    """One training per config (e.g. per objective, issue 21), each from the same start (``init_r``: per-step r of a
    panel start, :func:`amed_core.amed.predictor.init_from_steps`; else the config's seeded random init), each picked
    on ``validation``; returns (the best TrainResult on validation, or the first without one; [summary per config]).

    ``batches_for(cfg)``: a fresh iterable of TeacherBatches for that training."""
    from ..amed import AMEDPredictor, init_from_steps
    from ..amed.train import train_amed

    results, summaries = [], []
    for cfg in cfgs:
        predictor = AMEDPredictor(spec.predictor, seed=cfg.seed)
        if init_r is not None:
            init_from_steps(predictor, init_r)
        res = train_amed(denoiser, spec, cfg, batches_for(cfg), callback=callback, predictor=predictor.to(device),
                         validation=validation)
        v = res.validation or {}
        summaries.append({"objective": cfg.objective, "loss_target": cfg.loss_target, "best": v.get("best"),
                          "first": v.get("first"), "improved": v.get("improved"), "diverged": res.diverged,
                          "stopped_early": res.stopped_early, "updates": res.updates})
        results.append(res)
    scored = [(s["best"], i) for i, s in enumerate(summaries) if s["best"] is not None]
    pick = min(scored)[1] if scored else 0
    summaries[pick]["chosen"] = True
    return results[pick], summaries


def from_files(files: Mapping[str, bytes]):
    from ..amed import sampler_from_files

    return sampler_from_files(files)


def to_files(sampler) -> dict[str, bytes]:
    return sampler.files()


def describe(sampler) -> dict:
    s = sampler.spec
    return {"family": "amed", "method": s.solver, "solver": s.solver, "nfe": int(s.nfe), "denoiser_calls": int(s.nfe),
            "num_steps": int(s.num_steps), "afs": bool(s.afs)}
