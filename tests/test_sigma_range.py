"""Every evaluation helper runs on the denoiser's own sigma range (issue 14): a model whose range is not EDM's
0.002-80 must never be called outside it, and the base solver of compare_with_base runs on the sampler's range."""

from __future__ import annotations

import pytest
import torch

from amed_core.adapters import load_teacher


class Recording(torch.nn.Module):
    """A teacher with a non-EDM range (0.01-20) that records every sigma it is called with (no exact samples: RMSE)."""

    def __init__(self, inner, sigma_min=0.01, sigma_max=20.0):
        super().__init__()
        self.inner, self.sigma_min, self.sigma_max = inner, sigma_min, sigma_max
        self.shape, self.label_dim, self.feature_source = inner.shape, 0, getattr(inner, "feature_source", "")
        self.seen: list[float] = []

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        self.seen += [float(s.min()), float(s.max())]
        return self.inner(x, sigma, class_labels)

    def capture_features(self):
        return self.inner.capture_features()

    def identity(self):
        return {**self.inner.identity(), "name": "recording"}

    def in_range(self) -> bool:
        return min(self.seen) >= self.sigma_min * (1 - 1e-9) and max(self.seen) <= self.sigma_max * (1 + 1e-9)


@pytest.fixture()
def teacher():
    return Recording(load_teacher("digits-gmm"))


def test_sample_solver_and_reference_use_the_denoisers_range(teacher):
    from amed_core.evaluate import reference_solution, sample_solver, schedule_for, seeded_noise

    run = sample_solver(teacher, "ipndm", 5, 16, 0)
    assert (run.schedule.sigma_min, run.schedule.sigma_max) == (0.01, 20.0)
    assert teacher.in_range() and max(teacher.seen) == pytest.approx(20.0)
    teacher.seen.clear()
    reference_solution(teacher, seeded_noise(range(4), teacher.shape), num_steps=20)
    assert teacher.in_range() and max(teacher.seen) == pytest.approx(20.0)
    assert schedule_for(teacher, "dpmpp").schedule_type == "logsnr"  # the solver's default family, the model's range


def test_quality_table_uses_the_range_and_returns_the_reference(teacher):
    from amed_core.evaluate import quality_table

    tab = quality_table(teacher, ["euler", "dpmpp"], [4], n=32, seed=0, rmse_samples=8, reference_steps=20)
    assert teacher.in_range()
    assert tab.reference_x is not None and tuple(tab.reference_x.shape) == (8, *teacher.shape)
    teacher.seen.clear()
    again = quality_table(teacher, ["euler"], [4], n=32, seed=0, rmse_samples=8, reference=tab.reference_x)
    assert again.rows[0].rmse == pytest.approx(tab.rows[0].rmse)
    assert len(teacher.seen) == 2 * 4  # the solver's 4 calls only: the reference was not recomputed


def test_compare_with_base_runs_the_base_on_the_samplers_range(teacher):
    from amed_core.amed import AMEDPredictor, SamplerSpec, compare_with_base
    from amed_core.amed.checkpoint import Sampler

    spec = SamplerSpec.create("amed+ipndm", nfe=5, denoiser=teacher)
    assert (spec.schedule.sigma_min, spec.schedule.sigma_max) == (0.01, 20.0)
    sampler = Sampler(spec, AMEDPredictor(spec.predictor))
    rows, _ = compare_with_base(sampler, teacher, n=16, seed=0, rmse_samples=4, reference_steps=20)
    assert [r.name for r in rows][1].startswith("ipndm") and teacher.in_range()
    # a sampler made for another range is refused, not silently compared on different grids
    other = Recording(load_teacher("digits-gmm"), 0.002, 80.0)
    with pytest.raises(ValueError, match=r"sigma range \[0.01, 20\] is not the denoiser's \[0.002, 80\]"):
        compare_with_base(sampler, other, n=4, seed=0)
