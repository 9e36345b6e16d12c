"""The first round of the panel's successive halving (issue 21, item 6): every training-free entry of a (teacher, NFE)
scored on the same few hundred seeds in one pass, so only the best few need the full sample count.

:func:`rank_samplers` draws the noise of ``seeds`` once (the evaluation's own per-seed draw, :func:`~.score.score_run`'s,
so a finalist's full-count score starts from the same samples), and scores every sampler on it with the sweep's
metric where a few hundred samples can carry it:

- ``fd_exact``: the Frechet distance to the mixture's exact moments. Not RMSE: on digits-gmm at NFE 5 the two order
  the panel differently (512 samples: FD puts iPNDM time-uniform first, as the 4096-sample FD does; RMSE puts UniPC
  time-uniform with AFS first and leaves the FD winner out of its best 4; bench/panel_search.py);
- ``rmse`` (and ``fid``, whose statistics need thousands of samples and the Inception network): the RMSE to one
  near-exact solution of the same noise for every entry (:func:`~.sampling.reference_solution`, DPM-Solver++(3M) on
  ``reference_steps`` log-SNR points in float64; computed once per call, not once per entry).

A sampler that raises or gives non-finite samples ranks last (``inf``), with the reason in ``errors``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from ..metrics import fd_exact_gmm
from ..teacher import trajectory_inputs
from .sampling import reference_solution

__all__ = ["rank_samplers"]


def rank_samplers(samplers: Mapping[str, Callable], denoiser, *, seeds: Sequence[int], metric: str = "rmse",
                  batch_size: int = 512, reference_steps: int = 257, label_dim: int = 0, device="cpu") -> dict:
    """{"values": {key: value}, "metric": the metric ranked on, "errors": {key: reason}} for ``samplers``
    (``key -> sampler(denoiser, noise, class_labels=None) -> result with .x``); lower is better."""
    seeds = [int(s) for s in seeds]
    noise, idx = trajectory_inputs(seeds, denoiser.shape, label_policy="uniform" if label_dim else "none",
                                   label_dim=label_dim)
    noise = noise.to(device=device, dtype=torch.float64)
    labels = None if idx is None else torch.nn.functional.one_hot(idx, label_dim).to(device=device, dtype=torch.float64)
    ranked_on = "fd_exact" if metric == "fd_exact" else "rmse"
    ref = None
    if ranked_on == "rmse":
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
        if ranked_on == "fd_exact":
            values[key] = float(fd_exact_gmm(x.cpu(), denoiser))
        else:
            values[key] = float(((x - ref) ** 2).mean().sqrt())
    return {"values": values, "metric": ranked_on, "errors": errors}
