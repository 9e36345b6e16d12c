"""FID as the community computes it: Inception-v3 pool features of the TF 2015-12-05 graph.

FID (Heusel et al. 2017), as used for the AMED paper's tables (Zhou et al., arXiv 2312.00094, Sec. 5,
"FID on 50k samples" with EDM's reference statistics):

    FID = ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))

where (mu, S) are the float64 mean and covariance of the 2048-d average-pool features of the Inception
network translated from TensorFlow's ``inception-2015-12-05`` graph (the network behind TTUR, EDM's
``fid.py`` / StyleGAN3's detector, pytorch-fid's ``FIDInceptionA/C/E`` blocks and torch-fidelity).

What makes numbers comparable with the published reference statistics (and is reproduced here):
- the network: torchvision's Inception-v3 with the TF graph's differences (average pools that do not
  count padding, a max pool in the last block's pool branch, BatchNorm eps 1e-3, 1008 logits);
- input: uint8 RGB images ``[0, 255]`` (grayscale repeated to 3 channels, as EDM does); samples in
  ``[-1, 1]`` are quantised exactly as EDM's ``generate.py`` writes PNGs: ``(x * 127.5 + 128).clip(0, 255)``;
- resizing to 299x299 with TF1's bilinear rule (``src = dst * in / out``, no half-pixel shift, edge
  clamped; StyleGAN3's detector does this with an affine grid), then ``(x - 128) / 128``. The option
  ``resize="pytorch-fid"`` instead reproduces pytorch-fid's own preprocessing (``F.interpolate`` with
  half-pixel centres on ``x / 255``, then ``2 x - 1``), which shifts FID slightly;
- statistics accumulated in float64 as EDM does: ``mu = sum(f) / n``, ``S = (sum(f f^T) - n mu mu^T) / (n - 1)``.

Weights are never downloaded: pass the path of a local copy (``.safetensors``, or the pytorch-fid /
torch-fidelity ``pt_inception-2015-12-05-6726825d.pth`` state dict, loaded with ``weights_only=True``).
The network is :mod:`amed_core.inception` (its names are re-exported here); this module holds the statistics,
the image readers and the FID itself.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .inception import FEATURE_DIM, INPUT_SIZE, RESIZE_MODES, InceptionV3Features, load_inception, to_uint8
from .io import atomic_write
from .metrics import frechet_distance

__all__ = [
    "InceptionV3Features",
    "load_inception",
    "to_uint8",
    "FIDStats",
    "load_reference_stats",
    "save_stats",
    "iter_images",
    "stats_from_images",
    "stats_from_generator",
    "fid_from_stats",
    "RESIZE_MODES",
    "FEATURE_DIM",
    "INPUT_SIZE",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass
class FIDStats:
    """Float64 running sums ``n, sum f, sum f f^T``; mergeable (``a + b``) across batches and workers,
    so the statistics do not depend on how samples were batched."""

    n: int
    total: np.ndarray   # (D,)
    outer: np.ndarray   # (D, D)

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> "FIDStats":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def update(self, features) -> "FIDStats":
        f = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
        f = f.astype(np.float64).reshape(f.shape[0], -1)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        return self

    def __add__(self, other: "FIDStats") -> "FIDStats":
        return FIDStats(self.n + other.n, self.total + other.total, self.outer + other.outer)

    def to_bytes(self) -> bytes:
        """safetensors bytes (float64 sums, ``n`` in the metadata): cache a worker's partial statistics."""
        from safetensors.numpy import save

        return save({"total": self.total, "outer": self.outer}, metadata={"n": str(self.n), "format": "amed-fid-stats"})

    @classmethod
    def from_bytes(cls, data: bytes) -> "FIDStats":
        import json

        from safetensors.numpy import load

        data = bytes(data)
        try:
            arrays = load(data)
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            n = int(header["__metadata__"]["n"])
        except Exception as e:
            raise ValueError(f"not FIDStats bytes (safetensors with total, outer and metadata n): {e}") from e
        return cls(n, arrays["total"].astype(np.float64), arrays["outer"].astype(np.float64))

    def fid(self, mu_ref, sigma_ref) -> float:
        """FID of these statistics against reference ``(mu, sigma)``."""
        return frechet_distance(self.mu, self.sigma, mu_ref, sigma_ref)

    @property
    def mu(self) -> np.ndarray:
        return self.total / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"statistics need at least 2 samples, got {self.n}")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def save_stats(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu``, ``sigma`` as an ``.npz`` (EDM's reference format), atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))

    atomic_write(path, write)


def load_reference_stats(source) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from an ``.npz`` path, bytes or file object (EDM's fid-refs format)."""
    where = f"reference statistics {source}" if isinstance(source, (str, os.PathLike)) else "reference statistics"
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)) and os.path.lexists(source):
        from .io import read_limited

        source = io.BytesIO(read_limited(source, 2 << 30, what=where))  # a regular file, size checked first
    try:
        with np.load(source, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError(f"{where}: a .npy array, not an .npz with arrays 'mu' and 'sigma'")
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    except KeyError as e:
        raise ValueError(f"{where}: the .npz needs arrays 'mu' and 'sigma' ({e})") from None
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if str(e).startswith(where):
            raise
        # numpy's own text for a text file or a pickle invites unsafe loading: never shown
        raise ValueError(f"{where}: not an .npz of numbers with arrays 'mu' and 'sigma' (pickled or object data is "
                         "never loaded); write it with `amed fid-ref`") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"reference statistics: mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma


def fid_from_stats(mu, sigma, mu_ref, sigma_ref) -> float:
    """FID between two Gaussians (see amed_core.metrics.frechet_distance)."""
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# ----------------------------------------------------------------------------------------------
# Images and generators


def _decode(data: bytes) -> torch.Tensor:
    import PIL.Image

    with PIL.Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def iter_images(path) -> Iterator[torch.Tensor]:
    """uint8 ``(C, H, W)`` images from a folder (recursive) or a ``.zip``, in sorted name order (EDM's
    ImageFolderDataset order)."""
    path = Path(path)
    if path.is_dir():
        names = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise ValueError(f"images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(path)!r}")
        for p in names:
            yield _decode(p.read_bytes())
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES)
            if not names:
                raise ValueError(f"images: no image files in the zip {str(path)!r}")
            for n in names:
                yield _decode(z.read(n))
    else:
        raise ValueError(f"images: {str(path)!r} is neither a folder nor a .zip of images")


def _batched(items: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    buf: list[torch.Tensor] = []
    for it in items:
        buf.append(it)
        if len(buf) == batch_size:
            yield torch.stack(buf)
            buf = []
    if buf:
        yield torch.stack(buf)


def stats_from_images(net: InceptionV3Features, images: Iterable[torch.Tensor], *, batch_size: int = 64,
                      progress: bool = False) -> FIDStats:
    """Accumulate feature statistics over uint8 ``(C, H, W)`` images (e.g. ``iter_images(folder)``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = FIDStats.empty()
    batches = _batched(images, batch_size)
    if progress:
        from .progress import progress as progress_bar

        batches = progress_bar(batches, unit="batch", desc="inception")  # a bar on a terminal, lines elsewhere
    for batch in batches:
        stats.update(net(batch))
    return stats


def stats_from_generator(net: InceptionV3Features, generate: Callable[[Sequence[int]], torch.Tensor],
                         seeds: Sequence[int], *, batch_size: int = 64, progress: bool = False) -> FIDStats:
    """Statistics of ``generate(seeds) -> images in [-1, 1]`` over ``seeds``, in batches.

    ``generate`` must draw each sample's noise from its own seed (e.g. ``seeded_noise``); then each
    image, and so the score, is independent of the batch size and of how seeds are split over workers
    (merge the workers' FIDStats with ``+``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    stats = FIDStats.empty()
    starts = range(0, len(seeds), batch_size)
    if progress:
        from .progress import progress as progress_bar

        starts = progress_bar(starts, unit="batch", desc="fid")
    for s in starts:
        chunk = seeds[s:s + batch_size]
        stats.update(net(to_uint8(generate(chunk))))
    return stats
