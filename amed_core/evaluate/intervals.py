"""How sure a margin is: a paired bootstrap over samples of the ratio of two RMSEs measured on the same noise seeds.

A sweep's margin is ``value / panel_value``: the candidate's RMSE over the panel's best entry's, both over the same
evaluation seeds (sample ``j`` of each sees the noise of seed ``seed + j``). RMSE = sqrt(mean_j e_j^2) with ``e_j`` a
sample's RMSE, so resampling the seeds with replacement (the same indices for both: paired) and recomputing the ratio
gives its sampling distribution over noise seeds; the interval is its (1 - level) / 2 and (1 + level) / 2 percentiles
(percentile bootstrap). A margin whose interval contains 1 is not a win, however far below 1 it is.
"""

from __future__ import annotations

import torch

__all__ = ["margin_interval", "verdict"]


def margin_interval(errors: torch.Tensor, panel_errors: torch.Tensor, *, num_resamples: int = 2000,
                    level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of sqrt(mean e^2) / sqrt(mean p^2) over paired resamples of the samples."""
    e = torch.as_tensor(errors, dtype=torch.float64).reshape(-1)
    p = torch.as_tensor(panel_errors, dtype=torch.float64).reshape(-1)
    if e.shape != p.shape or e.numel() < 2:
        raise ValueError(f"margin_interval needs per-sample errors of the same seeds: got {tuple(e.shape)} and "
                         f"{tuple(p.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = e.numel()
    gen = torch.Generator().manual_seed(seed)
    e2, p2 = e.pow(2), p.pow(2)
    ratios = []
    for start in range(0, num_resamples, 256):  # bounded memory: 256 resamples of n indices at a time
        k = min(256, num_resamples - start)
        idx = torch.randint(n, (k, n), generator=gen)
        ratios.append((e2[idx].mean(dim=1) / p2[idx].mean(dim=1)).sqrt())
    r = torch.cat(ratios)
    r = r[torch.isfinite(r)]
    if r.numel() == 0:
        return float("nan"), float("nan")
    q = torch.quantile(r, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(q[0]), float(q[1])


def verdict(interval) -> str:
    """'better' (the whole interval below 1), 'worse' (above 1) or 'tie' (it contains 1)."""
    lo, hi = interval
    if hi < 1:
        return "better"
    if lo > 1:
        return "worse"
    return "tie"
