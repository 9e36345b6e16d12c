"""The photos teacher (issue 21, item 1): 32x32 RGB crops of photographs that ship inside scikit-image's and
scikit-learn's wheels (read by path, nothing downloaded), the ``amed teacher train-photos`` command, and the shipped
``photos-tiny-unet`` teacher: it loads without training, declares its data range and its samples look like its data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from amed_core.adapters import builtin_network_dir, load_teacher
from amed_core.tiny_train import PHOTO_SHORT_SIDES, PHOTOS, PhotoCrops, _package_file, photo_bank


def test_photos_ship_inside_the_wheels():
    for package, rel in PHOTOS:
        assert _package_file(package, rel).stat().st_size > 50_000, rel
    bank = photo_bank()
    assert len(bank) == len(PHOTOS) * len(PHOTO_SHORT_SIDES)
    for img, side in zip(bank, PHOTO_SHORT_SIDES * len(PHOTOS)):
        assert img.shape[0] == 3 and min(img.shape[1:]) == side and img.min() >= -1 and img.max() <= 1
    with pytest.raises(ValueError, match="pip install no-such-pkg"):
        _package_file("no-such-pkg", "x.png")


def test_crops_are_seeded_and_natural():
    crops = PhotoCrops(32)
    a, b = crops.draw(64, torch.Generator().manual_seed(3)), crops.draw(64, torch.Generator().manual_seed(3))
    assert a.shape == (64, 3, 32, 32) and torch.equal(a, b)
    assert 0.2 < float(a.std()) < 0.8  # natural images, not noise or flat colour


def test_train_photos_command_writes_a_loadable_teacher(tmp_path):
    out = tmp_path / "photos"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "teacher", "train-photos", "--out", str(out), "--steps",
                           "3", "--batch-size", "4", "--channels", "8", "--threads", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout[proc.stdout.index("{"):])
    den = load_teacher(info["teacher"])
    assert den.shape == (3, 32, 32) and den.data_range == (-1.0, 1.0) and den.config.extra["train"]["dataset"] == "photos"


def test_shipped_photos_teacher():
    den = load_teacher("photos-tiny-unet")
    cfg = json.loads((builtin_network_dir("photos-tiny-unet") / "config.json").read_text())
    assert den.shape == (3, 32, 32) and den.data_range == (-1.0, 1.0) and cfg["extra"]["train"]["dataset"] == "photos"
    assert (builtin_network_dir("photos-tiny-unet") / "model.safetensors").stat().st_size < 4_000_000
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with den.capture_features() as tap, torch.no_grad():
        d = den(x * 2.0, torch.tensor(2.0))
    assert d.shape == x.shape and tap.value.shape == (2, 8, 8)
    # its samples look like photographs: neighbouring pixels and the colour channels are correlated as in the crops
    # (data 0.95 / 0.76; the shipped teacher 0.92 / 0.90; an untrained network's samples 0.01 / 0.01, Gaussian noise)
    from amed_core.evaluate import reference_solution

    noise = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        s = reference_solution(den, noise, num_steps=33, batch_size=32)
    data = PhotoCrops(32).draw(512, torch.Generator().manual_seed(0))
    (nb_s, ch_s), (nb_d, ch_d) = _correlations(s), _correlations(data)
    assert abs(nb_s - nb_d) < 0.1 and ch_s > 0.5 and ch_d > 0.5, (nb_s, nb_d, ch_s, ch_d)
    assert abs(float(s.mean() - data.mean())) < 0.3  # 600 steps: darker than its data (BENCHMARKS "Neural teachers")


def _correlations(x: torch.Tensor) -> tuple[float, float]:
    """(correlation of horizontally neighbouring pixels, of the red and green channels)."""
    x = x.to(torch.float64)
    nb = torch.corrcoef(torch.stack([x[..., :, :-1].reshape(-1), x[..., :, 1:].reshape(-1)]))[0, 1]
    ch = torch.corrcoef(torch.stack([x[:, 0].reshape(-1), x[:, 1].reshape(-1)]))[0, 1]
    return float(nb), float(ch)
