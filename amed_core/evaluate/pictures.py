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

__all__ = ["figure_png", "save_figure_png", "save_grid_png", "save_quality_plot", "save_side_by_side_png",
           "shown_channels"]

def shown_channels(samples: torch.Tensor) -> torch.Tensor:
    """The channels a grid shows of (B, C, H, W) samples: C = 1 (gray) and C = 3 (RGB) as they are; C = 2 its first
    channel (gray); C > 3 its first three (RGB). A model of any channel count gets a picture (issue 19: a
    2-channel model trained, then the sweep failed drawing its grid); which channels are shown is this rule."""
    C = samples.shape[1]
    if C in (1, 3):
        return samples
    return samples[:, :1] if C == 2 else samples[:, :3]


def _grid_array(samples, nrow: int | None, pad: int, value_range) -> np.ndarray:
    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.ndim != 4 or x.shape[1] < 1 or x.shape[0] < 1:
        raise ValueError(f"samples must be (B, C, H, W) with B >= 1 and C >= 1, got {tuple(x.shape)}")
    x = shown_channels(x)
    B, C, H, W = x.shape
    if value_range is None:  # stretch the grid's own range
        lo, hi = float(x.min()), float(x.max())
        lo, hi = (lo, hi) if hi > lo else (lo - 1, lo + 1)
    else:
        lo, hi = (float(v) for v in value_range)
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / nrow)
    img = ((x.clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for k in range(B):
        r, c = divmod(k, nrow)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img[k]
    return grid


def _default_scale(H: int, W: int) -> int:
    return max(1, 128 // max(H, W))  # an 8x8 digit becomes 128 px; 32x32 images 128 px; 256 px images stay


def save_grid_png(samples: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None, scale: int | None = None,
                  pad: int = 1, value_range: tuple[float, float] | None = (-1.0, 1.0)) -> Path:
    """A PNG grid of images (B, C, H, W), values in ``value_range`` (default [-1, 1]; None: the grid's own min..max);
    C = 1 gray, C = 3 RGB, other C: the first channel (C = 2) or the first three as RGB (:func:`shown_channels`);
    small images are enlarged (nearest) to about 128 px each unless ``scale`` is given."""
    from PIL import Image

    grid = _grid_array(samples, nrow, pad, value_range)
    C = grid.shape[2]
    H, W = torch.as_tensor(samples).shape[-2:]
    scale = scale or _default_scale(int(H), int(W))
    pil = Image.fromarray(grid[..., 0] if C == 1 else grid, mode="L" if C == 1 else "RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def save_side_by_side_png(panels: dict[str, torch.Tensor], path: str | os.PathLike, *, nrow: int | None = None,
                          scale: int | None = None, value_range: tuple[float, float] | None = (-1.0, 1.0)) -> Path:
    """Grids side by side under their titles (e.g. ``{"amed+ipndm NFE 5": x, "ipndm NFE 5 (base)": x_base}``: the
    same seeds, so a column compares the same noise), as one PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("panels must hold at least one grid")
    grids = [(title, _grid_array(x, nrow, 1, value_range)) for title, x in panels.items()]
    H, W = next(iter(panels.values())).shape[-2:]
    scale = scale or _default_scale(int(H), int(W))
    width = sum(g.shape[1] for _, g in grids) * scale / 100 + 0.3 * len(grids)
    height = max(g.shape[0] for _, g in grids) * scale / 100 + 0.5
    fig, axes = plt.subplots(1, len(grids), figsize=(width, height), squeeze=False)
    for ax, (title, g) in zip(axes[0], grids):
        ax.imshow(g[..., 0] if g.shape[2] == 1 else g, cmap="gray" if g.shape[2] == 1 else None, vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    return save_figure_png(fig, path, dpi=100)


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


def figure_png(fig, *, dpi: int = 100) -> bytes:
    """Lay out a matplotlib figure, return it as PNG bytes and close it (plots attached to MLflow / Prefect)."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_figure_png(fig, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Lay out a matplotlib figure, write it as a PNG atomically (:func:`atomic_write`) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
