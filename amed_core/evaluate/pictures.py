"""The pictures: sample grids and quality plots as PNG (PIL / matplotlib Agg), written atomically
(:func:`amed_core.io.atomic_write`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write
from .tables import QualityTable

__all__ = ["save_figure_png", "save_grid_png", "save_quality_plot"]

def save_grid_png(samples: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None, scale: int | None = None,
                  pad: int = 1) -> Path:
    """A PNG grid of images in [-1, 1] (B, C, H, W) with C = 1 or 3; small images are enlarged (nearest)."""
    from PIL import Image

    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"samples must be (B, 1 or 3, H, W) with B >= 1, got {tuple(x.shape)}")
    B, C, H, W = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / nrow)
    scale = scale or max(1, 64 // max(H, W))
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for k in range(B):
        r, c = divmod(k, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img[k]
    pil = Image.fromarray(grid[..., 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def save_quality_plot(table: QualityTable, path: str | os.PathLike, *, title: str = "") -> Path:
    """FD and RMSE against NFE, one line per solver (log scale), as a PNG (RMSE only without exact samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["fd"] if table.has_fd else []) + ["rmse"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = list(axes[0])
    solvers = list(dict.fromkeys(r.solver for r in table.rows))
    for s in solvers:
        rs = sorted((r for r in table.rows if r.solver == s), key=lambda r: r.nfe)
        for ax, key in zip(axes, panels):
            ax.plot([r.nfe for r in rs], [getattr(r, key) for r in rs], marker="o", label=s)
    nfes = sorted({r.nfe for r in table.rows})
    for ax in axes:
        ax.set_xticks(nfes)
    if table.has_fd:
        axes[0].axhline(table.fd_floor, color="gray", ls="--", lw=1, label="exact samples")
    names = {"fd": "FD to exact samples", "rmse": "RMSE to near-exact ODE solution"}
    for ax, name in zip(axes, (names[k] for k in panels)):
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"quality vs NFE (n={table.n}, seed={table.seed})")
    return save_figure_png(fig, path, dpi=100)


def save_figure_png(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Lay out a matplotlib figure, write it as a PNG atomically (:func:`atomic_write`) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
