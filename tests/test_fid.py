"""FID compatibility without downloads: the same (random) weights loaded into our Inception and into
torch-fidelity's give the same features; our Frechet distance equals scipy's sqrtm formula (EDM's
fid.py, pytorch-fid) and torchmetrics' on the same statistics; statistics do not depend on batching."""

from __future__ import annotations

import importlib.util
import sys
import types
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
from fid_weights import random_state_dict
from safetensors.torch import save_file

from amed_core.fid import (
    FIDStats,
    iter_images,
    load_inception,
    load_reference_stats,
    stats_from_generator,
    to_uint8,
)
from amed_core.metrics import frechet_distance


def _register_torch_fidelity() -> bool:
    """Make torch-fidelity's Inception module importable, unchanged. Its package ``__init__`` also imports
    the CLIP / VGG extractors, which need torchvision (not importable next to torch 2.13 here); the Inception
    module and everything it imports do not, so the package is registered without running ``__init__``.
    Returns False when torch-fidelity is not installed."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return False
    if "torch_fidelity" not in sys.modules:
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["torch_fidelity"] = pkg
    return True


def _import_torch_fidelity():
    if not _register_torch_fidelity():
        pytest.skip("torch-fidelity not installed: pip install --no-deps torch-fidelity==0.4.0 "
                    "(its torchvision dependency does not import next to torch 2.13)")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("inception")
    sd = random_state_dict()
    torch.save(sd, d / "pt_inception-random.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "inception-random.safetensors"))
    return d / "pt_inception-random.pth", d / "inception-random.safetensors"


@pytest.fixture(scope="module")
def net(weights):
    return load_inception(weights[0])


def test_features_equal_torch_fidelity_on_same_weights(weights, net):
    FeatureExtractorInceptionV3 = _import_torch_fidelity()
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights[0]))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)  # CIFAR-sized: exercises the resize
    ours = net(x)
    (ref,) = theirs(x)
    assert ours.shape == (2, 2048)
    assert ours.std() > 0.1  # random weights still give informative features
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # the safetensors copy of the same weights gives the same network
    st = load_inception(weights[1]).state_dict()
    assert all(torch.equal(v, st[k]) for k, v in net.state_dict().items())


def test_frechet_distance_matches_scipy_and_torchmetrics():
    rng = np.random.default_rng(0)
    d = 48
    a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3
    b = rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)

    # EDM fid.py / pytorch-fid: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    scipy_fd = float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * covmean)))
    assert ours == pytest.approx(scipy_fd, rel=1e-9, abs=1e-9)

    _register_torch_fidelity()  # torchmetrics' FID module imports torch-fidelity's Inception when installed
    from torchmetrics.image.fid import _compute_fid

    tm = float(_compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))))
    assert ours == pytest.approx(tm, rel=1e-9, abs=1e-9)
    # identical distributions are at distance 0; symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-10)


def test_frechet_distance_robust_on_rank_deficient_covariances():
    # fewer samples than dimensions: singular covariances, where sqrtm of S1 S2 is ill-conditioned
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.1
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
    ref = float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - 2 * covmean)))
    assert np.isfinite(ours) and ours > 0
    assert ours == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu1[:3], s1, mu2, s2)


def _generate(seeds):
    """Per-sample seeds: each image depends only on its own seed."""
    return torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)).tanh() for s in seeds])


SEEDS = [3, 1]


@pytest.fixture(scope="module")
def features(net):
    """Features of the SEEDS images computed in one batch."""
    return net(to_uint8(_generate(SEEDS))).double().numpy()


def test_stats_match_edm_formula_and_do_not_depend_on_batching(net, features):
    split = stats_from_generator(net, _generate, SEEDS[:1], batch_size=1) + stats_from_generator(net, _generate, SEEDS[1:], batch_size=1)
    assert split.n == 2
    np.testing.assert_allclose(split.mu, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split.sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-5)
    assert split.sigma.dtype == np.float64


def test_to_uint8_is_edms_quantisation():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]


def test_fid_ref_cli_from_folder_and_zip(tmp_path, weights, features, capsys):
    import PIL.Image

    from flows.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    imgs = to_uint8(_generate(SEEDS)).permute(0, 2, 3, 1).numpy()  # the images behind `features`
    for i, im in enumerate(imgs):
        PIL.Image.fromarray(im).save(folder / f"{i:05d}.png")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for p in sorted(folder.iterdir()):
            z.write(p, p.name)
    decoded = list(iter_images(folder))  # (C, H, W) uint8 in sorted order, PNG round trip is lossless
    assert all(torch.equal(d, torch.from_numpy(im).permute(2, 0, 1)) for d, im in zip(decoded, imgs))

    out = tmp_path / "ref.npz"
    assert main(["fid-ref", "--images", str(tmp_path / "imgs.zip"), "--weights", str(weights[0]), "--out", str(out), "--batch", "1"]) == 0
    mu, sigma = load_reference_stats(out)
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-5)
    # `amed fid` of the same images against those statistics (as a file:// URL) is ~0
    assert main(["fid", "--images", str(folder), "--ref", f"file://{out}", "--weights", str(weights[0]), "--batch", "2"]) == 0
    assert abs(float(capsys.readouterr().out.strip().splitlines()[-1])) < 1e-2

    # bad input names the field
    assert main(["fid-ref", "--images", str(tmp_path / "missing"), "--weights", str(weights[0]), "--out", str(out)]) == 2
    with pytest.raises(ValueError, match="weights"):
        load_inception(tmp_path / "nope.pth")
    bad = tmp_path / "bad.npz"
    np.savez(bad, m=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        load_reference_stats(bad)


def test_fidstats_needs_two_samples_and_round_trips():
    s = FIDStats.empty(4).update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = s.sigma
    rng = np.random.default_rng(3)
    f = rng.normal(size=(10, 4))
    full = FIDStats.empty(4).update(f)
    back = FIDStats.from_bytes(FIDStats.empty(4).update(f[:6]).to_bytes()) + FIDStats.empty(4).update(f[6:])
    assert back.n == 10
    np.testing.assert_allclose(back.sigma, np.cov(f, rowvar=False), rtol=1e-12, atol=1e-12)
    assert back.fid(full.mu, full.sigma) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="FIDStats"):
        FIDStats.from_bytes(b"not safetensors")
