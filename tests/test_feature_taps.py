"""Feature taps of concurrent evaluations (a CI crash, 2026-12-07): the registry logs candidates on threads that share
one denoiser, so several taps are registered at once; leaving a block must remove its own tap by identity (the
dataclass's == compared the taps' tensors and raised "Boolean value of Tensor ... is ambiguous")."""

import torch

from amed_core.base_denoiser import FeatureTap


def test_a_tap_is_removed_by_identity_while_others_hold_tensors():
    first, second = FeatureTap(torch.randn(2, 8, 8)), FeatureTap(torch.randn(2, 8, 8))
    taps = [first, second]
    taps.remove(second)  # compares with `first` on the way: must not compare tensors
    assert len(taps) == 1 and taps[0] is first
    assert FeatureTap(torch.zeros(1)) != FeatureTap(torch.zeros(1))  # identity, not value
