"""Feature taps of concurrent evaluations (a CI crash, 2026-12-07): the registry logs candidates on threads that share
one denoiser, so several taps are registered at once; leaving a block must remove its own tap by identity (the
dataclass's == compared the taps' tensors and raised "Boolean value of Tensor ... is ambiguous")."""

import threading

import pytest
import torch

from amed_core.base_denoiser import FeatureTap


def test_a_tap_is_removed_by_identity_while_others_hold_tensors():
    first, second = FeatureTap(torch.randn(2, 8, 8)), FeatureTap(torch.randn(2, 8, 8))
    taps = [first, second]
    taps.remove(second)  # compares with `first` on the way: must not compare tensors
    assert len(taps) == 1 and taps[0] is first
    assert FeatureTap(torch.zeros(1)) != FeatureTap(torch.zeros(1))  # identity, not value


class _Net(torch.nn.Module):
    """A small conv net whose `body` output feeds AMED (the forward-hook path of wrap_model)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, t):
        return self.head(torch.tanh(self.body(x)))


def _denoisers():
    from amed_core.adapters import load_teacher, wrap_model
    from amed_core.integrations.kdiffusion import KDiffusionModel

    torch.manual_seed(0)
    hooked = wrap_model(_Net(), sigma_min=0.01, sigma_max=10.0, shape=(1, 8, 8), feature_module="body", identity="n@1")
    return {"hook (wrap_model feature_module)": hooked,
            "emitted (the mixture)": load_teacher("digits-gmm"),
            "k-diffusion wrapper (denoised)": KDiffusionModel(lambda x, s: x / (1 + s[:, None, None, None] ** 2),
                                                              torch.tensor([10.0, 0.01]), shape=(1, 8, 8))}


@pytest.mark.parametrize("kind", ["hook (wrap_model feature_module)", "emitted (the mixture)",
                                  "k-diffusion wrapper (denoised)"])
def test_threads_sharing_a_denoiser_read_only_their_own_features(kind):
    """Two threads each open a capture block on one shared denoiser, then evaluate in turn (barriers fix the order:
    A evaluates, then B, then both read). Each tap must hold the features of its own thread's evaluation; before taps
    were per thread, both held B's (A's sampler would have fed its predictor another batch's features)."""
    den = _denoisers()[kind]
    shape = (3, *den.shape)
    xs = {"A": torch.randn(shape, dtype=torch.float64 if kind.startswith("emitted") else torch.float32),
          "B": None}
    xs["B"] = -3 * xs["A"] + 1
    sigma = 2.0
    expected = {}
    for name, x in xs.items():  # each thread's features, alone
        with den.capture_features() as tap:
            den(x, sigma)
        expected[name] = tap.value.clone()
    assert not torch.allclose(expected["A"], expected["B"])
    opened, a_done, b_done = (threading.Barrier(2) for _ in range(3))
    got, errors = {}, []

    def run(name):
        try:
            with den.capture_features() as tap:
                opened.wait(10)
                if name == "B":
                    a_done.wait(10)
                den(xs[name], sigma)
                if name == "A":
                    a_done.wait(10)
                b_done.wait(10)  # B has evaluated too
                got[name] = tap.value
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for name in ("A", "B"):
        torch.testing.assert_close(got[name], expected[name], msg=f"{kind}: thread {name} read another's features")
    assert den._taps == {} and getattr(den, "_tap_hook", None) is None  # everything removed after the blocks


def test_a_denoiser_still_pickles_after_capturing():
    """Ray ships denoisers to workers by pickling: no lock or hook may stay on them after a capture block."""
    import pickle

    den = _denoisers()["hook (wrap_model feature_module)"]
    with den.capture_features():
        den(torch.randn(2, 1, 8, 8), 1.0)
    again = pickle.loads(pickle.dumps(den))
    x = torch.randn(2, 1, 8, 8)
    with again.capture_features() as tap:
        out = again(x, 1.0)
    torch.testing.assert_close(out, den(x, 1.0))
    assert tap.value.shape == (2, 8, 8)
