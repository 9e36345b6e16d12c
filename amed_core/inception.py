"""The Inception-v3 feature network of FID: the TF 2015-12-05 graph in torch (see :mod:`amed_core.fid` for how
the pieces make numbers comparable with the published reference statistics).

- the network: torchvision's Inception-v3 with the TF graph's differences (average pools that do not
  count padding, a max pool in the last block's pool branch, BatchNorm eps 1e-3, 1008 logits);
- input: uint8 RGB images ``[0, 255]`` (grayscale repeated to 3 channels, as EDM does); samples in
  ``[-1, 1]`` are quantised exactly as EDM's ``generate.py`` writes PNGs (:func:`to_uint8`);
- resizing to 299x299 with TF1's bilinear rule (``src = dst * in / out``, no half-pixel shift, edge
  clamped), or ``resize="pytorch-fid"`` (``F.interpolate`` with half-pixel centres on ``x / 255``, then ``2 x - 1``).

Weights are never downloaded: pass the path of a local copy (``.safetensors``, or the pytorch-fid /
torch-fidelity ``pt_inception-2015-12-05-6726825d.pth`` state dict, loaded with ``weights_only=True``).
The key names of that state dict are the module names used below.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FEATURE_DIM", "INPUT_SIZE", "RESIZE_MODES", "InceptionV3Features", "load_inception", "to_uint8"]

FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE_MODES = ("tf1", "pytorch-fid")


# ----------------------------------------------------------------------------------------------
# The network (module names = the state-dict keys of the standard weight file)


class _ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TF's average pool ignores the zero padding (count_include_pad=False).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max3(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)


class _Mixed35(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class _Reduce35(nn.Module):
    """35 -> 17 grid reduction (Mixed_6a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed17(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class _Reduce17(nn.Module):
    """17 -> 8 grid reduction (Mixed_7a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class _Mixed8(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 branches; the TF graph pools with
    an average in Mixed_7b and a *max* in Mixed_7c (``pool``)."""

    def __init__(self, c_in: int, pool: Callable):
        super().__init__()
        self._pool = pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        d = self.branch_pool(self._pool(x))
        return torch.cat([a, b, c, d], 1)


def _resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: ``src = dst * in / out`` (no half-pixel shift),
    neighbours ``floor(src)`` and ``min(floor(src) + 1, in - 1)``; interpolated along W, then H."""

    def axis(n_in: int, dim: int, x: torch.Tensor) -> torch.Tensor:
        if n_in == size:
            return x
        src = np.arange(size, dtype=np.float64) * (n_in / size)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        w = torch.as_tensor(src - i0, dtype=x.dtype, device=x.device).reshape(shape)
        lo = x.index_select(dim, torch.as_tensor(i0, device=x.device))
        hi = x.index_select(dim, torch.as_tensor(i1, device=x.device))
        return lo + (hi - lo) * w

    return axis(x.shape[2], 2, axis(x.shape[3], 3, x))


class InceptionV3Features(nn.Module):
    """FID Inception-v3: uint8 images ``(B, 3|1, H, W)`` in ``[0, 255]`` -> ``(B, 2048)`` pool features."""

    def __init__(self, *, resize: str = "tf1"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Mixed35(192, 32)
        self.Mixed_5c = _Mixed35(256, 64)
        self.Mixed_5d = _Mixed35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b = _Mixed17(768, 128)
        self.Mixed_6c = _Mixed17(768, 160)
        self.Mixed_6d = _Mixed17(768, 160)
        self.Mixed_6e = _Mixed17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b = _Mixed8(1280, _avg3)
        self.Mixed_7c = _Mixed8(2048, _max3)
        self.fc = nn.Linear(2048, 1008)  # logits of the TF graph; unused for FID, kept for strict loading
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # BatchNorm must always use the stored statistics
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 255]) images -> the network's 299x299 input in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1|3, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        x = images.to(torch.float32)
        if self.resize == "tf1":
            return (_resize_tf1(x, INPUT_SIZE) - 128) / 128
        x = x / 255
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.fc.weight.device))
        # stem: 299 -> 35
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        # 35x35, 17x17, 8x8 blocks
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def _read_state_dict(source) -> dict[str, torch.Tensor]:
    """A state dict from a local path, bytes or a binary file object; safetensors or a ``.pth``
    state dict (``torch.load(weights_only=True)``: plain tensors only, never arbitrary pickles)."""
    from safetensors.torch import load as st_load

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"weights: no file at {str(path)!r}; pass the local path of the Inception weights "
                             "(pt_inception-2015-12-05-6726825d.pth or a .safetensors copy); they are never downloaded")
        from .io import read_limited

        data = read_limited(path, 2 << 30, what=f"weights {str(path)!r}")  # a regular file, size checked first
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        data = source.read()
    if data[:2] == b"PK" or data[:1] == b"\x80":  # torch zip archive or legacy pickle protocol
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise ValueError(f"weights: not a plain state dict loadable with weights_only=True ({e})") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        return dict(sd)
    try:
        return st_load(data)
    except Exception as e:
        raise ValueError(f"weights: neither a safetensors file nor a torch state dict ({e})") from e


def load_inception(weights, *, resize: str = "tf1", device: str | torch.device = "cpu") -> InceptionV3Features:
    """The FID Inception network with weights from ``weights`` (path, bytes or file object)."""
    net = InceptionV3Features(resize=resize)
    sd = _read_state_dict(weights)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    # BatchNorm step counters are absent from some conversions and never used at inference.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weights: not the FID Inception (2015-12-05) state dict: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, v in sd.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"weights: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    net.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return net.to(device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] -> uint8 exactly as EDM's generate.py quantises them for its PNGs."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


