"""Scoring learned AMED samplers next to training-free solvers at the same NFE (arXiv 2312.00094, Tables 1-3 style).

- ``sample_amed(sampler, denoiser, n, seed)``: samples from per-sample seeded noise (``seeded_noise``), batched.
- ``policy_trace(sampler, denoiser, noise)``: the learned r / scale_dir / scale_time per step (mean, std over samples).
- ``compare_with_base(sampler, denoiser, n, seed)``: FD to exact mixture samples and RMSE to the near-exact ODE
  solution, for the sampler and its base solver at the same NFE (``amed_core.evaluate`` does the base runs);
  a teacher without exact samples (a network) gets RMSE only (``fd`` None).
- ``save_policy_plot(trace, path)``: PNG of the per-step policy (matplotlib, Agg).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..evaluate import (base_options, baseline_name, batch_ranges, denoiser_range, exact_samples, has_exact_samples,
                        reference_solution, sample_solver, save_figure_png, seeded_noise)
from ..metrics import fd_to_samples, rmse
from .checkpoint import Sampler

__all__ = ["AmedRun", "sample_amed", "policy_trace", "compare_with_base", "save_policy_plot", "policy_plot_png", "Scores"]


@dataclass
class AmedRun:
    x: torch.Tensor
    nfe: int
    seconds: float


def sample_amed(sampler: Sampler, denoiser, n: int, seed: int, *, batch_size: int = 1024, noise: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float64) -> AmedRun:
    """``n`` samples from noise seeds ``seed .. seed + n - 1`` (or the given noise), in batches."""
    if n < 1:
        raise ValueError(f"n (number of samples) must be >= 1, got {n}")
    if noise is None:
        noise = seeded_noise(range(seed, seed + n), denoiser.shape, dtype=dtype)
    out, nfe = [], 0
    t0 = time.perf_counter()
    for lo, hi in batch_ranges(noise.shape[0], batch_size):
        res = sampler(denoiser, noise[lo:hi].to(dtype))
        out.append(res.x)
        nfe = res.nfe
    return AmedRun(torch.cat(out), nfe, time.perf_counter() - t0)


class _Recording:
    def __init__(self, policy):
        self.policy, self.rows = policy, []

    def __call__(self, features, t_cur, t_next, step_idx):
        r, sd, st = self.policy(features, t_cur, t_next, step_idx)
        self.rows.append((step_idx, float(t_cur), float(t_next), r.detach(), sd.detach(), st.detach()))
        return r, sd, st


def policy_trace(sampler: Sampler, denoiser, noise: torch.Tensor, class_labels: torch.Tensor | None = None
                 ) -> dict[str, list[float]]:
    """Per step i: t_cur, t_next, mean/std over samples of r, scale_dir, scale_time (and the intermediate time s)."""
    rec = _Recording(sampler.predictor)
    sampler(denoiser, noise, class_labels=class_labels, policy=rec)
    out: dict[str, list[float]] = {k: [] for k in ("t_cur", "t_next", "s_mean", "r_mean", "r_std", "scale_dir_mean",
                                                   "scale_dir_std", "scale_time_mean", "scale_time_std")}
    for _, tc, tn, r, sd, st in rec.rows:
        out["t_cur"].append(tc)
        out["t_next"].append(tn)
        out["s_mean"].append(float((tn ** r * tc ** (1 - r)).mean()))
        for name, v in (("r", r), ("scale_dir", sd), ("scale_time", st)):
            out[f"{name}_mean"].append(float(v.mean()))
            out[f"{name}_std"].append(float(v.std()) if v.numel() > 1 else 0.0)
    return out


@dataclass
class Scores:
    """One sampler's scores at its NFE; ``fd`` is None when the teacher draws no exact samples."""

    name: str
    nfe: int
    fd: float | None
    rmse: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_with_base(sampler: Sampler, denoiser, n: int, seed: int, *, base_solver: str | None = None,
                      base_afs: bool | None = None, rmse_samples: int = 512, exact: torch.Tensor | None = None,
                      batch_size: int = 1024, reference_steps: int = 500) -> tuple[list[Scores], AmedRun]:
    """FD (n samples vs n exact mixture samples) and RMSE (first ``rmse_samples`` vs the near-exact ODE solution)
    of the sampler and of ``base_solver`` (default: the plugin's base, heun for the AMED-Solver) at the same NFE.
    Without exact samples (``exact`` not given and the teacher has no ``.sample``) FD is None: RMSE only.

    The base solver is the one a sweep scores the sampler next to: the sampler's own schedule (over its sigma range,
    which must be the denoiser's) and :func:`amed_core.evaluate.base_options` (its AFS, unless ``base_afs``, and
    order); its row is named by :func:`amed_core.evaluate.baseline_name` with those options. (Before issue 19 the
    base ran its own default schedule and options here, another sampler than the sweep's base of the same name.)"""
    spec = sampler.spec
    lo, hi = denoiser_range(denoiser)
    if not (np.isclose(spec.schedule.sigma_min, lo) and np.isclose(spec.schedule.sigma_max, hi)):
        raise ValueError(f"the sampler's sigma range [{spec.schedule.sigma_min:g}, {spec.schedule.sigma_max:g}] is not the "
                         f"denoiser's [{lo:g}, {hi:g}]: it was made for another model (or schedule); scores would compare "
                         "different grids")
    noise = seeded_noise(range(seed, seed + n), denoiser.shape)
    if exact is None and has_exact_samples(denoiser):
        exact = exact_samples(denoiser, n, seed)
    m = min(rmse_samples, n)
    ref = reference_solution(denoiser, noise[:m], spec.schedule, num_steps=reference_steps)

    def scores(name: str, x: torch.Tensor, nfe: int, seconds: float) -> Scores:
        return Scores(name, nfe, None if exact is None else fd_to_samples(x, exact), rmse(x[:m], ref), seconds)

    run = sample_amed(sampler, denoiser, n, seed, noise=noise, batch_size=batch_size)
    rows = [scores(spec.solver, run.x, run.nfe, run.seconds)]
    base = base_solver or spec.base_solver
    opts = base_options(base, afs=spec.afs if base_afs is None else base_afs, max_order=spec.max_order,
                        predict_x0=spec.predict_x0, lower_order_final=spec.lower_order_final,
                        dynamic_thresholding=spec.dynamic_thresholding)
    try:
        afs = opts.pop("afs")
        b = sample_solver(denoiser, base, spec.nfe, n, seed, spec.schedule, opts, noise=noise, afs=afs,
                          batch_size=batch_size)
        rows.append(scores(baseline_name(base, {"afs": b.afs, **opts}, spec.schedule), b.x, b.nfe, b.seconds))
    except ValueError:
        pass  # the base solver cannot spend exactly this NFE (e.g. heun at an odd NFE without AFS)
    return rows, run


def save_policy_plot(trace: dict, path: str | os.PathLike, *, title: str = "") -> Path:
    """The learned schedule and scales per step, as one PNG written atomically: the student's sigma grid with the
    learned intermediate times s (log axis), then r, scale_dir and scale_time (mean with a +-std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(trace["r_mean"]))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    if trace.get("t_cur"):
        grid = list(trace["t_cur"]) + [trace["t_next"][-1]]
        axes[0].plot(np.arange(len(grid)), grid, "o-", color="0.4", label="grid sigma_i")
        axes[0].plot(steps + np.asarray(trace["r_mean"]), trace["s_mean"], "s", color="C1", label="learned s (mean)")
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
    axes[0].set_title("schedule")
    axes[0].set_xlabel("step i")
    axes[0].grid(alpha=0.3)
    for ax, name in zip(axes[1:], ("r", "scale_dir", "scale_time")):
        mu, sd = np.asarray(trace[f"{name}_mean"]), np.asarray(trace[f"{name}_std"])
        ax.plot(steps, mu, "o-")
        ax.fill_between(steps, mu - sd, mu + sd, alpha=0.25)
        ax.set_xlabel("step i")
        ax.set_title(name)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    return save_figure_png(fig, path, dpi=110)


def policy_plot_png(sampler: Sampler, denoiser, noise: torch.Tensor, *, class_labels: torch.Tensor | None = None,
                    title: str = "") -> bytes:
    """PNG bytes of :func:`save_policy_plot` for ``sampler`` on ``noise`` (the registry's learned-schedule plot)."""
    import tempfile

    trace = policy_trace(sampler, denoiser, noise, class_labels)
    with tempfile.TemporaryDirectory(prefix="amed-plot-") as tmp:
        return save_policy_plot(trace, Path(tmp) / "policy.png", title=title).read_bytes()
