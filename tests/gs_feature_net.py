"""A small local feature network for GS's pluggable distance (tests): fixed random conv weights, two feature maps, as
LPIPS reads a backbone's layers. ``build()`` is what ``--loss py:gs_feature_net:build`` / ``families.gs.loss`` call."""

from __future__ import annotations

import torch

from amed_core.methods.gs import FeatureDistance


class TinyFeatures(torch.nn.Module):
    def __init__(self, channels: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c1 = torch.nn.Conv2d(channels, 8, 3, padding=1).double()
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)

    def forward(self, x):
        a = torch.relu(self.c1(x.double()))
        return [a, torch.relu(self.c2(a))]


def build() -> FeatureDistance:
    return FeatureDistance(TinyFeatures(), name="tiny-features")
