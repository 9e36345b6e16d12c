"""Random Inception weights with the standard file's keys (nothing downloaded), shared by the FID tests."""

from __future__ import annotations

import torch

from amed_core.fid import InceptionV3Features


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights scaled so activations stay O(1) through the network's 94 convolutions."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in InceptionV3Features().state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("num_batches_tracked"):
            sd[k] = v.clone()
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return sd
