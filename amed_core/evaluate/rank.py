"""The first round of the panel's successive halving (issue 21, item 6): every training-free entry of a (teacher, NFE)
scored on the same few hundred seeds in one pass, so only the best few need the full sample count.

:func:`rank_samplers` draws the noise of ``seeds`` once (the evaluation's own per-seed draw, :func:`~.score.score_run`'s,
so a finalist's full-count score starts from the same samples), and scores every sampler on it by its RMSE to one
near-exact solution of the same noise (:func:`~.sampling.reference_solution`, DPM-Solver++(3M) on ``reference_steps``
log-SNR points in float64; computed once per call, not once per entry), whatever the sweep's metric: the errors are
paired (same noise, same reference), so a few hundred samples order the entries; a Frechet distance (fd_exact, FID)
on a few hundred samples is dominated by its own sampling noise (on digits-gmm a 128-sample FD ranked DEIS first
where the 512-sample one ranks iPNDM, tests/test_panel_flow.py's sweep). The finalists' full-count scores use the
sweep's metric.

A sampler that raises or gives non-finite samples ranks last (``inf``), with the reason in ``errors``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from ..teacher import trajectory_inputs
from .sampling import reference_solution

__all__ = ["rank_samplers"]


def rank_samplers(samplers: Mapping[str, Callable], denoiser, *, seeds: Sequence[int], batch_size: int = 512,
                  reference_steps: int = 257, label_dim: int = 0, device="cpu") -> dict:
    """{"values": {key: RMSE}, "metric": "rmse", "errors": {key: reason}} for ``samplers``
    (``key -> sampler(denoiser, noise, class_labels=None) -> result with .x``); lower is better."""
    seeds = [int(s) for s in seeds]
    noise, idx = trajectory_inputs(seeds, denoiser.shape, label_policy="uniform" if label_dim else "none",
                                   label_dim=label_dim)
    noise = noise.to(device=device, dtype=torch.float64)
    labels = None if idx is None else torch.nn.functional.one_hot(idx, label_dim).to(device=device, dtype=torch.float64)
    ref = reference_solution(denoiser, noise, num_steps=reference_steps, batch_size=batch_size,
                             class_labels=labels).to(torch.float64)
    values, errors = {}, {}
    for key, sampler in samplers.items():
        try:
            xs = []
            for lo in range(0, len(seeds), batch_size):
                sl = slice(lo, lo + batch_size)
                with torch.no_grad():
                    xs.append(sampler(denoiser, noise[sl], class_labels=None if labels is None else labels[sl]).x)
            x = torch.cat(xs).to(torch.float64)
        except (ValueError, RuntimeError) as e:
            values[key], errors[key] = math.inf, str(e).splitlines()[0][:200]
            continue
        if not bool(torch.isfinite(x).all()):
            values[key], errors[key] = math.inf, "non-finite samples"
            continue
        values[key] = float(((x - ref) ** 2).mean().sqrt())
    return {"values": values, "metric": "rmse", "errors": errors}
