"""One set of defaults for the Python API and the CLI (issue 14): SamplerSpec.create(recipe=...) gives what
`amed train --preset` builds, for every AMED solver; the schedule comes from the method table over the denoiser's range."""

from __future__ import annotations

import argparse

import pytest

from amed_core.adapters import load_teacher
from amed_core.amed import SamplerSpec, TrainConfig
from amed_core.amed.recipes import RECIPES
from amed_core.amed.train import train_config
from amed_core.methods import get_method, method_names


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("solver", sorted(method_names("amed")))
def test_python_api_matches_amed_train(solver, recipe, tmp_path):
    from flows.commands import train as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--teacher", "digits-gmm", "--solver", solver, "--nfe", "5", "--out",
                              str(tmp_path), "--preset", recipe])
    denoiser, cli_spec, cli_cfg = cmd.build(args)
    spec = SamplerSpec.create(solver, 5, denoiser=load_teacher("digits-gmm"), recipe=recipe)
    assert spec == cli_spec
    assert train_config(solver, recipe) == cli_cfg
    assert spec.schedule.schedule_type == get_method(solver).default_schedule.schedule_type


def test_defaults_and_range():
    t = load_teacher("digits-gmm")
    spec = SamplerSpec.create("amed", 3, denoiser=t)
    assert spec.schedule.schedule_type == "time_uniform" and (spec.schedule.sigma_min, spec.schedule.sigma_max) == (
        t.sigma_min, t.sigma_max)
    ip = SamplerSpec.create("amed+ipndm", 5, recipe="improved")
    assert ip.afs_in_history is False and ip.predictor.scale_time == 0.2
    assert SamplerSpec.create("amed+ipndm", 5).afs_in_history is True  # reference = the Python default
    assert train_config("amed", "reference") == TrainConfig()
    with pytest.raises(ValueError, match="recipe must be one of"):
        SamplerSpec.create("amed", 3, recipe="fast")
