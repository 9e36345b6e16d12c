"""A teacher's data range, and the dynamic-thresholding default that follows from it.

Dynamic thresholding (Imagen; DPM-Solver++ and UniPC apply it to their data predictions, on by default in the
reference whenever ``predict_x0``) clamps each prediction to ``[-s, s]`` and divides by ``s`` with
``s = max(1, 99.5th percentile of |x0|)``: it assumes the data live in [-1, 1]. On data outside [-1, 1] it rescales
every prediction and ruins the sampler (issue 21: a score network on data in about [-3, 3], DPM-Solver++ RMSE 0.604
with it, 0.146 without). So where the sweep chooses a default (its panel, the teacher solver, base solvers, AMED-Plugin
on DPM-Solver++), thresholding is on only for a teacher whose data range is known to lie inside [-1, 1]:

- declared: ``denoiser.data_range`` (the tiny UNets, EDM image networks, diffusers pixel UNets, the digits mixture
  declare (-1, 1); ``wrap_model(..., data_range=(lo, hi))`` for your own model);
- else measured (:func:`measure_data_range`): a few near-exact samples of the model (DPM-Solver++(3M) on log-SNR
  points, no thresholding, float64) and their 0.5 / 99.5 percentiles, widened by :data:`MEASURE_TOLERANCE`;
- unknown (None): off. Calling a solver directly keeps the reference's default (``dynamic_thresholding=None`` follows
  ``predict_x0``); only the defaults chosen for a model change.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from .base_denoiser import check_data_range
from .methods import get_method, solve
from .schedules import ScheduleSpec

__all__ = ["MEASURE_TOLERANCE", "declared_data_range", "measure_data_range", "data_range_of",
           "default_thresholding", "thresholding_options"]

MEASURE_TOLERANCE = 0.05  # a measured range counts as inside [-1, 1] up to this much beyond it (sampling noise)


def declared_data_range(denoiser) -> Optional[tuple[float, float]]:
    """The range the model declares (``denoiser.data_range``), checked; None when it declares none."""
    value = getattr(denoiser, "data_range", None)
    return None if value is None else check_data_range(value, f"{type(denoiser).__name__}.data_range")


def measure_data_range(denoiser, *, num_samples: int = 16, num_steps: int = 33, seed: int = 0,
                       batch_size: int = 16) -> tuple[float, float]:
    """(0.5th, 99.5th) percentile of the pixel values of ``num_samples`` samples of the model: DPM-Solver++(3M),
    ``num_steps`` log-SNR points over the model's sigma range, no thresholding, float64, noise from ``seed``.
    Costs ``num_samples * (num_steps - 1)`` denoiser evaluations."""
    lo, hi = float(denoiser.sigma_min), float(denoiser.sigma_max)
    sigmas = ScheduleSpec("logsnr", sigma_min=lo, sigma_max=hi).grid(num_steps)
    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    gen = torch.Generator().manual_seed(seed)
    dev = next((p.device for p in list(denoiser.parameters()) + list(denoiser.buffers())), torch.device("cpu"))
    xs = []
    for start in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - start)
        noise = torch.randn(b, *denoiser.shape, generator=gen, dtype=torch.float64)
        labels = None
        if label_dim:
            labels = torch.nn.functional.one_hot(torch.randint(label_dim, (b,), generator=gen), label_dim)
            labels = labels.to(device=dev, dtype=torch.float64)
        with torch.no_grad():
            res = solve("dpmpp", denoiser, (noise * sigmas[0]).to(dev), sigmas, class_labels=labels, max_order=3,
                        predict_x0=True, lower_order_final=True, dynamic_thresholding=False)
        xs.append(res.x.detach().to("cpu", torch.float64).reshape(-1))
    x = torch.cat(xs)
    if not torch.isfinite(x).all():
        raise ValueError("measuring the data range: the model's samples are not finite; declare its data_range")
    q = torch.quantile(x[: 1 << 24], torch.tensor([0.005, 0.995], dtype=torch.float64))
    return float(q[0]), float(q[1])


def data_range_of(denoiser, *, measure: bool = True, **measure_options) -> tuple[Optional[tuple[float, float]], str]:
    """(range, how): the declared range ('declared'), else the measured one ('measured'), else (None, 'unknown')."""
    declared = declared_data_range(denoiser)
    if declared is not None:
        return declared, "declared"
    if measure:
        return measure_data_range(denoiser, **measure_options), "measured"
    return None, "unknown"


def default_thresholding(data_range, how: str = "declared") -> bool:
    """Whether dynamic thresholding is on by default: only for data known to lie inside [-1, 1] (a measured range
    up to :data:`MEASURE_TOLERANCE` beyond it); off for wider data and for an unknown range (None)."""
    if data_range is None:
        return False
    low, high = check_data_range(data_range)
    tol = MEASURE_TOLERANCE if how == "measured" else 0.0
    return low >= -1.0 - tol and high <= 1.0 + tol


def thresholding_options(solver: str, options: Mapping | None, data_range, how: str = "declared") -> dict:
    """``options`` of ``solver`` with ``dynamic_thresholding`` filled in where the solver takes it and it is not set
    (absent or None): on only when ``predict_x0`` (the reference's condition) and :func:`default_thresholding`.
    A value the user set is kept."""
    opts = dict(options or {})
    m = get_method(solver)
    if "dynamic_thresholding" not in m.options or opts.get("dynamic_thresholding") is not None:
        return opts
    predict_x0 = opts.get("predict_x0", m.default_options.get("predict_x0", True))
    opts["dynamic_thresholding"] = bool(predict_x0) and default_thresholding(data_range, how)
    return opts
